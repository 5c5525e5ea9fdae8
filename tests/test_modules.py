"""The modules: parameters as nn.Linear's, and ProgressiveFusion's semantics end to end."""
import pytest
import torch
from torch import nn

import pf_kernels as pk
from pf_kernels.nn import BackProjection, FusionHead, ProgressiveFusion


class MeanPoolEncoder(nn.Module):
    """(B, *positions, D) -> (B, H): a per-position MLP, then the mean over positions."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, out_dim))

    def forward(self, x):
        y = self.mlp(x)
        return y.flatten(1, -2).mean(1) if y.dim() > 2 else y


def make_model(iterations=3, context=(3, 2, 4), dtype=torch.float32, backend="auto", **activations):
    dims = (5, 3, 2)  # a vector, a sequence and a channels-last image modality
    encoders = [MeanPoolEncoder(d + c, 6 + j) for j, (d, c) in enumerate(zip(dims, context))]
    model = ProgressiveFusion(encoders, [6, 7, 8], fused_dim=9, context_dims=list(context),
                              iterations=iterations, backend=backend, **activations)
    return model.to(dtype)


def make_inputs(B=4, dtype=torch.float32):
    return [torch.randn(B, 5, dtype=dtype), torch.randn(B, 11, 3, dtype=dtype),
            torch.randn(B, 4, 3, 2, dtype=dtype)]


def test_linear_layout_and_init_match_nn_linear():
    torch.manual_seed(0)
    reference = nn.Linear(7, 4)
    torch.manual_seed(0)
    bp = BackProjection(7, 4)
    assert bp.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(bp.weight, reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(bp.bias, reference.bias, rtol=0, atol=0)
    head = FusionHead([3, 4], 5, bias=False)
    head.load_state_dict(nn.Linear(7, 5, bias=False).state_dict())
    assert head.bias is None and "bias" not in head.state_dict()


def test_modules_compute_the_reference():
    bp = BackProjection(6, 3, activation="tanh")
    x, z = torch.randn(2, 4, 5), torch.randn(2, 6)
    torch.testing.assert_close(bp(x, z), pk.reference.backproj_concat(x, z, bp.weight, bp.bias, "tanh"))
    head = FusionHead([2, 3], 4, activation="gelu")
    hs = [torch.randn(5, 2), torch.randn(5, 3)]
    torch.testing.assert_close(head(hs), pk.reference.fusion_head(hs, head.weight, head.bias, "gelu"))
    with pytest.raises(ValueError, match="in_dims"):
        head([torch.randn(5, 3), torch.randn(5, 2)])
    with pytest.raises(ValueError, match="activation"):
        BackProjection(3, 2, activation="swish")


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_progressive_fusion_shapes_and_steps(iterations):
    model = make_model(iterations)
    out = model(make_inputs())
    assert out.shape == (4, 9)
    steps = model(make_inputs(), return_all_steps=True)
    assert len(steps) == iterations and all(s.shape == (4, 9) for s in steps)
    assert model(make_inputs(B=0)).shape == (0, 9)


def test_progressive_fusion_is_the_unrolled_loop():
    """The model equals the method written out by hand: zero context, then back-projected z."""
    model = make_model(iterations=3)
    xs = make_inputs()
    ctx = [torch.zeros(*x.shape[:-1], c) for x, c in zip(xs, model.context_dims)]
    for _ in range(3):
        hs = [enc(torch.cat([x, c], -1)) for enc, x, c in zip(model.encoders, xs, ctx)]
        z = torch.relu(nn.functional.linear(torch.cat(hs, -1), model.fusion_head.weight, model.fusion_head.bias))
        ctx = [torch.relu(nn.functional.linear(z, bp.weight, bp.bias)).view(
            z.shape[0], *[1] * (x.dim() - 2), -1).expand(*x.shape[:-1], -1)
            for bp, x in zip(model.back_projections, xs)]
    torch.testing.assert_close(model(xs), z)


def test_every_parameter_gets_a_gradient():
    # Smooth activations: a dead ReLU unit would rightly get a zero gradient.
    model = make_model(fusion_activation="gelu", context_activation="tanh")
    model(make_inputs()).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert any("back_proj" in name for name, _ in model.named_parameters())


def test_back_projections_change_the_output():
    model = make_model()
    xs = make_inputs()
    before = model(xs)
    with torch.no_grad():
        for bp in model.back_projections:
            bp.weight.zero_()
            bp.bias.zero_()
    after = model(xs)
    assert not torch.allclose(before, after)
    # With zero back-projections every step sees a zero context: all steps agree.
    steps = model(xs, return_all_steps=True)
    torch.testing.assert_close(steps[0], steps[-1])


def test_state_dict_round_trips_between_backends():
    model = make_model(backend="torch")
    other = make_model(backend="auto")
    other.load_state_dict(model.state_dict())
    xs = make_inputs()
    torch.testing.assert_close(model(xs), other(xs))
    model.backend = "auto"
    assert all(m.backend == "auto" for m in [model.fusion_head, *model.back_projections])
    with pytest.raises(ValueError, match="backend"):
        model.backend = "nope"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_progressive_fusion_other_dtypes(dtype):
    model = make_model(dtype=dtype)
    out = model(make_inputs(dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_bad_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="3 encoders"):
        model(make_inputs()[:2])
    with pytest.raises(TypeError, match="list"):
        model(torch.randn(4, 5))
    with pytest.raises(ValueError, match="context_dims"):
        ProgressiveFusion([nn.Identity()], [3], 4, [1, 2])


def test_short_training_run_fits():
    """A target that needs two modalities together: the loss falls far below its start."""
    torch.manual_seed(0)
    model = make_model(iterations=2)
    readout = nn.Linear(9, 1)
    opt = torch.optim.Adam([*model.parameters(), *readout.parameters()], lr=1e-2)
    xs = make_inputs(B=256)
    target = (xs[0][:, :1] * xs[1].mean(1)[:, :1]).tanh()
    loss0 = None
    for _ in range(300):
        loss = nn.functional.mse_loss(readout(model(xs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    assert loss.item() < 0.3 * loss0, f"loss {loss0:.4f} -> {loss.item():.4f}"
