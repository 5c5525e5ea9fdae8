"""convert(): pf_kernels modules switched, plain-PyTorch patterns rewritten, outputs and gradients kept."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import pf_kernels as pk
from pf_kernels.convert import fused_backproj_concat, fused_fusion_head
from pf_kernels.nn import ProgressiveFusion


class LateFusionHead(nn.Module):
    def __init__(self, dims, out):
        super().__init__()
        self.linear = nn.Linear(sum(dims), out)
        self.act = nn.GELU()

    def forward(self, hs):
        return self.act(self.linear(torch.cat(hs, dim=-1)))


class PlainProgressiveModel(nn.Module):
    """Progressive Fusion written the usual way: nn.Linear, torch.cat, a broadcast context."""

    def __init__(self, steps=2):
        super().__init__()
        self.steps = steps
        self.enc_vec = nn.Sequential(nn.Linear(5 + 3, 8), nn.Tanh())
        self.enc_seq = nn.Linear(4 + 2, 8)
        self.head = LateFusionHead([8, 8], 6)
        self.back_vec = nn.Linear(6, 3)
        self.back_seq_weight = nn.Parameter(torch.randn(2, 6) * 0.4)  # the functional form
        self.back_seq_bias = nn.Parameter(torch.randn(2) * 0.1)

    def forward(self, vec, seq):
        ctx_vec = vec.new_zeros(vec.shape[0], 3)
        ctx_seq = seq.new_zeros(seq.shape[0], seq.shape[1], 2)
        for _ in range(self.steps):
            h_vec = self.enc_vec(torch.cat([vec, ctx_vec], -1))
            h_seq = self.enc_seq(torch.cat([seq, ctx_seq], -1)).mean(1)
            z = self.head([h_vec, h_seq])
            ctx_vec = torch.relu(self.back_vec(z))
            ctx_seq = torch.sigmoid(F.linear(z, self.back_seq_weight, self.back_seq_bias))
            ctx_seq = ctx_seq.unsqueeze(1).expand(-1, seq.shape[1], -1)
        return z


def inputs(B=5):
    return torch.randn(B, 5), torch.randn(B, 7, 4)


def fused_calls(model):
    return [n.target for n in model.graph.nodes if n.op == "call_function"
            and n.target in (fused_fusion_head, fused_backproj_concat)]


def assert_same_outputs_and_grads(original, converted, args):
    out_a = original(*args)
    out_b = converted(*args)
    torch.testing.assert_close(out_b, out_a)
    g = torch.randn_like(out_a)
    params_a = dict(original.named_parameters())
    params_b = dict(converted.named_parameters())
    assert params_a.keys() == params_b.keys()
    grads_a = torch.autograd.grad(out_a, list(params_a.values()), g)
    grads_b = torch.autograd.grad(out_b, [params_b[k] for k in params_a], g)
    for name, ga, gb in zip(params_a, grads_a, grads_b):
        torch.testing.assert_close(gb, ga, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_plain_model_is_rewritten_and_equal(backend):
    model = PlainProgressiveModel()
    converted, report = pk.convert(model, backend=backend)
    assert isinstance(converted, fx.GraphModule)
    calls = fused_calls(converted)
    assert calls.count(fused_backproj_concat) == 2  # the vector and the sequence back-projection
    assert calls.count(fused_fusion_head) >= 2        # the head, twice (and linear(cat) inputs)
    assert "backproj_concat" in str(report) and "fusion_head" in str(report)
    assert_same_outputs_and_grads(model, converted, inputs())
    # The converted state_dict loads into the original, key for key.
    fresh = PlainProgressiveModel()
    fresh.load_state_dict(converted.state_dict())
    args = inputs(3)
    torch.testing.assert_close(fresh(*args), converted(*args))


def test_round_trip_to_torch_backend():
    model = PlainProgressiveModel()
    converted, _ = pk.convert(model)
    back, report = pk.convert(converted, backend="torch")
    assert back is converted
    assert all(n.args[-2 if n.target is fused_fusion_head else -1] == "torch"
               for n in back.graph.nodes if n.op == "call_function" and n.target in (fused_fusion_head, fused_backproj_concat))
    assert report.backends_set
    assert_same_outputs_and_grads(model, back, inputs())


class PartlyMatching(nn.Module):
    """A late-fusion head that matches, and a cat with the context *before* x, which must not."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(7, 4)
        self.back = nn.Linear(4, 2)

    def forward(self, a, b, x):
        z = torch.relu(self.head(torch.cat([a, b], -1)))
        return torch.cat([torch.tanh(self.back(z)), x], -1)


def test_only_some_patterns_match():
    model = PartlyMatching()
    converted, report = pk.convert(model)
    assert fused_calls(converted) == [fused_fusion_head]
    assert any("matches no fused pattern" in note for note in report.left_alone)
    args = (torch.randn(3, 3), torch.randn(3, 4), torch.randn(3, 5))
    assert_same_outputs_and_grads(model, converted, args)


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: fx cannot trace it, but its child can be rewritten."""

    def __init__(self):
        super().__init__()
        self.fusion = LateFusionHead([3, 4], 5)

    def forward(self, a, b):
        z = self.fusion([a, b])
        if z.sum() > 0:  # data-dependent
            return z
        return -z


def test_untraceable_model_is_left_working_and_children_converted():
    model = Untraceable()
    args = (torch.randn(4, 3), torch.randn(4, 4))
    expected = model(*args)
    converted, report = pk.convert(model)
    assert converted is model
    assert any("cannot trace" in note for note in report.left_alone)
    assert isinstance(model.fusion, fx.GraphModule)  # the child was rewritten in place
    torch.testing.assert_close(converted(*args), expected)


class PoolingEncoder(nn.Module):
    """An encoder fx cannot trace (an `if` on a proxy), inside a ModuleList."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.net = nn.Linear(d_in, d_out)

    def forward(self, x):
        y = self.net(x)
        return y.mean(1) if y.dim() > 2 else y


class ModelWithUntraceableEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([PoolingEncoder(5 + 3, 8), PoolingEncoder(4 + 3, 8)])
        self.fusion = nn.Linear(16, 6)
        self.back = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3)])

    def forward(self, vec, seq):
        ctx = [vec.new_zeros(vec.shape[0], 3), seq.new_zeros(seq.shape[0], seq.shape[1], 3)]
        for _ in range(2):
            hs = [self.encoders[0](torch.cat([vec, ctx[0]], -1)), self.encoders[1](torch.cat([seq, ctx[1]], -1))]
            z = torch.tanh(self.fusion(torch.cat(hs, -1)))
            ctx = [torch.relu(self.back[0](z)),
                   torch.relu(self.back[1](z)).unsqueeze(1).expand(-1, seq.shape[1], -1)]
        return z


def test_untraceable_children_are_kept_opaque_and_the_rest_rewritten():
    model = ModelWithUntraceableEncoders()
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference_model = ModelWithUntraceableEncoders()
    reference_model.load_state_dict(original_state)
    converted, report = pk.convert(model)
    assert isinstance(converted, fx.GraphModule)
    assert fused_calls(converted).count(fused_fusion_head) == 2
    assert fused_calls(converted).count(fused_backproj_concat) == 2
    assert any("kept as opaque calls" in note for note in report.left_alone)
    assert_same_outputs_and_grads(reference_model, converted, inputs())
    reference_model.load_state_dict(converted.state_dict())


def test_pf_kernels_modules_get_the_backend():
    encoders = [nn.Linear(4 + 2, 6), nn.Linear(3 + 2, 6)]
    model = ProgressiveFusion(encoders, [6, 6], 5, 2)
    converted, report = pk.convert(model, backend="torch")
    assert converted is model and model.backend == "torch"
    assert len(report.backends_set) == 3
    with pytest.raises(ValueError, match="backend"):
        pk.convert(model, backend="nonsense")
    with pytest.raises(TypeError, match="model"):
        pk.convert("not a model")


def test_no_patterns_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    converted, report = pk.convert(model)
    assert converted is model and not report.replaced
