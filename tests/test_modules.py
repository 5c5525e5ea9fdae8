"""The modules: parameters as nn.Linear's, and ProgressiveFusion's semantics end to end."""
import copy
import re
import sys

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


def _unrolled(model, xs):
    """The method written out with the model's own modules called: what hooks on them expect."""
    ctx = [torch.zeros(*x.shape[:-1], c) for x, c in zip(xs, model.context_dims)]
    z = None
    for step in range(model.iterations):
        hs = [enc(torch.cat([x, c], -1)) for enc, x, c in zip(model.encoders, xs, ctx)]
        z = model.fusion_head(hs)
        if step < model.iterations - 1:
            ctx = [bp(x, z)[..., x.shape[-1]:] for bp, x in zip(model.back_projections, xs)]
    return z


@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted", "unhoisted"])
def test_hooks_on_the_head_and_back_projections_run_at_every_step(hoist):
    """The steps before the last read the head's and back-projections' weights without calling them:
    their hooks ran once and never, pruning (a pre-hook that sets the weight) raised "backward through
    the graph a second time" at the second training step, and the older spectral_norm left its
    weight_orig without a gradient."""
    from torch.nn.utils import prune

    class MeanOverPositions(nn.Module):
        def forward(self, h):
            return h.mean(1)

    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(5 + 3, 6), nn.Tanh()),
                nn.Sequential(nn.Linear(3 + 2, 7), nn.Tanh(), MeanOverPositions()),
                nn.Sequential(nn.Linear(4 + 4, 8), nn.GELU(), MeanOverPositions())]
    model = ProgressiveFusion(encoders, [6, 7, 8], 9, [3, 2, 4], iterations=3, hoist=hoist)
    reference = copy.deepcopy(model)
    calls = {"head": 0, "bp1": 0}
    model.fusion_head.register_forward_hook(lambda m, i, o: calls.__setitem__("head", calls["head"] + 1))
    hook = model.back_projections[1].register_forward_pre_hook(
        lambda m, i: calls.__setitem__("bp1", calls["bp1"] + 1))
    xs = [torch.randn(4, 5), torch.randn(4, 11, 3), torch.randn(4, 6, 4)]
    torch.testing.assert_close(model(xs), _unrolled(reference, xs))
    assert calls == {"head": 3, "bp1": 2}
    assert model.hoisted == ((0, 2) if hoist else ())
    assert not hoist or "back-projection has hooks" in model.hoisting_notes[1]
    hook.remove()
    assert model.hoisted == ((0, 1, 2) if hoist else ())
    for m in (model, reference):
        prune.l1_unstructured(m.fusion_head, "weight", amount=0.3)
        prune.l1_unstructured(m.back_projections[0], "weight", amount=0.3)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    for _ in range(3):
        for m, o, forward in ((model, opt, model), (reference, ref_opt, lambda x: _unrolled(reference, x))):
            o.zero_grad()
            forward(xs).square().mean().backward()
            o.step()
        torch.testing.assert_close(model.fusion_head.weight_orig, reference.fusion_head.weight_orig)
        torch.testing.assert_close(model.back_projections[0].weight_orig, reference.back_projections[0].weight_orig)
    with torch.no_grad():
        torch.testing.assert_close(model(xs), _unrolled(reference, xs))


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


def test_an_input_on_another_device_is_named():
    model = make_model()
    xs = make_inputs()
    xs[1] = xs[1].to("meta")
    with pytest.raises(ValueError, match=r"xs\[1\] is on meta but the model's parameters are on cpu"):
        model(xs)


def test_an_input_of_the_wrong_width_for_a_hoisted_encoder_is_named():
    model = ProgressiveFusion([nn.Linear(6 + 3, 4), nn.Sequential(nn.Linear(4 + 3, 6), nn.ReLU())], [4, 6], 5, 3)
    with pytest.raises(ValueError, match=r"xs\[1\] has 5 features and context_dims\[1\] = 3, but the first "
                                         r"Linear of encoders\[1\] takes 7"):
        model([torch.randn(2, 6), torch.randn(2, 7, 5)])


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("iterations", [1, 3])
def test_an_encoder_of_the_wrong_output_shape_is_named(hoist, iterations):
    for encoder, shape in ((nn.Linear(4 + 3, 5), "(2, 5)"), (nn.Sequential(nn.Linear(4 + 3, 6)), "(2, 7, 6)")):
        model = ProgressiveFusion([nn.Linear(6 + 3, 4), encoder], [4, 6], 5, 3, iterations=iterations, hoist=hoist)
        x = torch.randn(2, 4) if shape == "(2, 5)" else torch.randn(2, 7, 4)
        with pytest.raises(ValueError, match=rf"encoders\[1\] returned shape {re.escape(shape)} .* must return "
                                             rf"\(B, encoder_dims\[1\]\) = \(2, 6\)"):
            model([torch.randn(2, 6), x])


@pytest.mark.parametrize("encoders", [{"audio": nn.Linear(5, 4)}, nn.ModuleDict({"audio": nn.Linear(5, 4)}),
                                      nn.Linear(5, 4), [nn.Linear(5, 4), "video"]], ids=["dict", "ModuleDict",
                                                                                        "one module", "a str"])
def test_encoders_other_than_a_list_of_modules_are_refused_by_name(encoders):
    # (a dict iterates over its keys: its str keys reached nn.ModuleList's own message)
    with pytest.raises(TypeError, match=r"encoders(\[1\])? must be (a list|an nn.Module)"):
        ProgressiveFusion(encoders, [4] * (2 if isinstance(encoders, list) else 1), 5, 2)


@pytest.mark.parametrize("hoist", [True, False])
def test_an_encoder_that_raises_on_its_input_is_named(hoist):
    # (an Identity before the Linear: not hoisted either) the encoder itself meets the (2, 7 + 3) input
    encoder = nn.Sequential(nn.Identity(), nn.Linear(9, 4)) if hoist else nn.Linear(9, 4)
    model = ProgressiveFusion([nn.Linear(6 + 3, 4), encoder], [4, 4], 5, 3, hoist=hoist)
    with pytest.raises(RuntimeError) as info:
        model([torch.randn(2, 6), torch.randn(2, 7)])
    if sys.version_info >= (3, 11):
        assert "ProgressiveFusion: raised by encoders[1] in step 1 on its input xs[1] (2, 7) with " \
               "context_dims[1] = 3" in "".join(info.value.__notes__)


SIZE_BAD = [
    ("FusionHead in_dims float", lambda: FusionHead([2.7, 3], 4), TypeError, r"in_dims\[0\] must be an int, got 2.7"),
    ("FusionHead in_dims bool", lambda: FusionHead([True, 3], 4), TypeError, r"in_dims\[0\] must be an int, got True"),
    ("FusionHead in_dims zero", lambda: FusionHead([3, 0], 4), ValueError, r"in_dims\[1\] must be an int >= 1, got 0"),
    ("FusionHead in_dims empty", lambda: FusionHead([], 4), ValueError, "in_dims must hold at least one"),
    ("FusionHead in_dims int", lambda: FusionHead(3, 4), TypeError, "in_dims must be a list of ints, got 3"),
    ("FusionHead out_dim bool", lambda: FusionHead([3], True), TypeError, "out_dim must be an int, got True"),
    ("BackProjection context_dim float", lambda: BackProjection(5, 2.5), TypeError,
     "context_dim must be an int, got 2.5"),
    ("BackProjection context_dim negative", lambda: BackProjection(5, -1), ValueError,
     "context_dim must be an int >= 0"),
    ("BackProjection fused_dim zero", lambda: BackProjection(0, 2), ValueError, "fused_dim must be an int >= 1, got 0"),
    ("context_dims float", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5, [2.5]), TypeError,
     r"context_dims\[0\] must be an int, got 2.5"),
    ("context_dims bool", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5, True), TypeError,
     "context_dims must be an int, got True"),
    ("context_dims negative", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5, [-1]), ValueError,
     r"context_dims\[0\] must be an int >= 0, got -1"),
    ("encoder_dims float", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6.0], 5, 2), TypeError,
     r"encoder_dims\[0\] must be an int, got 6.0"),
    ("fused_dim float", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5.0, 2), TypeError,
     "fused_dim must be an int, got 5.0"),
    ("iterations bool", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5, 2, iterations=True), TypeError,
     "iterations must be an int, got True"),
    ("iterations float", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5, 2, iterations=2.0), TypeError,
     "iterations must be an int, got 2.0"),
    ("iterations zero", lambda: ProgressiveFusion([nn.Linear(4, 6)], [6], 5, 2, iterations=0), ValueError,
     "iterations must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("name,make,exc,message", SIZE_BAD, ids=[c[0] for c in SIZE_BAD])
def test_sizes_are_ints_never_truncated(name, make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_sizes_take_integer_scalars_of_numpy_and_torch():
    np = pytest.importorskip("numpy")
    head = FusionHead(np.array([2, 3]), torch.tensor(4))
    assert head.in_dims == [2, 3] and all(type(d) is int for d in head.in_dims) and head.out_features == 4
    model = ProgressiveFusion([nn.Linear(4, 6)], [np.int64(6)], 5, np.int32(2), iterations=np.int64(2))
    assert model.context_dims == [2] and type(model.iterations) is int


class PooledMLP(nn.Module):
    """(B, *positions, D) -> (B, H): an MLP per position, then the mean over positions; hoistable
    (torch.fx traces it: no branch on the input's shape)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, out_dim))

    def forward(self, x):
        return self.mlp(x).flatten(1, -2).mean(1)


_TRITON = pk.available_backends()["triton"]


@pytest.mark.parametrize("hoisting", ["every encoder", "the others", "none"])
@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=pytest.mark.skipif(
    not _TRITON["available"] or "cpu" not in _TRITON["devices"], reason="triton cannot run on CPU tensors here"))])
def test_a_modality_with_context_dim_0_reads_its_input_unchanged(hoisting, backend):
    """context_dims[j] = 0: modality j gets no back-projection (its encoder reads x_j at every step)
    while z still fuses its output; against the method written out by hand, forward and gradients."""
    encoders = [nn.Sequential(nn.Linear(5 + 3, 16), nn.Tanh(), nn.Linear(16, 6)), PooledMLP(3, 7), PooledMLP(2 + 4, 8)]
    model = ProgressiveFusion(encoders, [6, 7, 8], 9, [3, 0, 4], iterations=3, fusion_activation="gelu",
                              context_activation="tanh", backend=backend)
    if hoisting == "the others":
        encoders[1].register_forward_pre_hook(lambda module, args: None)  # runs it unhoisted
    model.hoist = hoisting != "none"
    assert model.hoisted == {"every encoder": (0, 1, 2), "the others": (0, 2), "none": ()}[hoisting]
    head, bp = model.fusion_head, model.back_projections
    assert bp[1].weight.shape == (0, 9) and bp[1].bias.shape == (0,)
    xs = make_inputs()

    def by_hand():
        c0, c2 = torch.zeros(4, 3), torch.zeros(4, 4, 3, 4)
        for _ in range(3):
            hs = [encoders[0](torch.cat([xs[0], c0], -1)), encoders[1](xs[1]),
                  encoders[2](torch.cat([xs[2], c2], -1))]
            z = nn.functional.gelu(nn.functional.linear(torch.cat(hs, -1), head.weight, head.bias))
            c0 = torch.tanh(nn.functional.linear(z, bp[0].weight, bp[0].bias))
            c2 = torch.tanh(nn.functional.linear(z, bp[2].weight, bp[2].bias))[:, None, None].expand(4, 4, 3, 4)
        return z

    params = [p for p in model.parameters() if p.numel()]
    got, want = model(xs), by_hand()
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)
    (empty,) = torch.autograd.grad(model(xs).sum(), bp[1].weight)
    assert empty.shape == (0, 9)
    model.load_state_dict(ProgressiveFusion([copy.deepcopy(e) for e in encoders], [6, 7, 8], 9, [3, 0, 4]).state_dict())


def assert_no_context_modality_by_hand(model, first, x):
    """model: ProgressiveFusion, R=3, relu head and back-projections, modality 0 without context,
    modality 1 a vector with 4 context features; its output and parameters' gradients against the
    method written out by hand (the first input read as it is at every step)."""
    encoders, head, bp = model.encoders, model.fusion_head, model.back_projections[1]

    def by_hand():
        c = torch.zeros(x.shape[0], 4)
        for _ in range(3):
            hs = [encoders[0](first), encoders[1](torch.cat([x, c], -1))]
            z = torch.relu(nn.functional.linear(torch.cat(hs, -1), head.weight, head.bias))
            c = torch.relu(nn.functional.linear(z, bp.weight, bp.bias))
        return z

    got, want = model([first, x]), by_hand()
    torch.testing.assert_close(got, want)
    params = [p for p in model.parameters() if p.numel()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(a, b)


class TokenEncoder(nn.Module):
    """Token ids (B, T) -> (B, H): an embedding, then the mean over tokens."""

    def __init__(self, vocabulary, out_dim):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, out_dim)

    def forward(self, ids):
        return self.embedding(ids).mean(1)


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_modality_without_context_takes_token_ids(hoist, backend):
    """context_dims[j] = 0 and integer inputs (token ids for an nn.Embedding): read as they are at
    every step, in fp32 and under autocast; against the method written out by hand."""
    torch.manual_seed(0)
    encoders = [TokenEncoder(20, 6), nn.Sequential(nn.Linear(3 + 4, 8), nn.Tanh())]
    model = ProgressiveFusion(encoders, [6, 8], 5, [0, 4], iterations=3, backend=backend, hoist=hoist)
    assert model.hoisted == ((1,) if hoist else ())
    ids, x = torch.randint(0, 20, (6, 9)), torch.randn(6, 3)
    assert_no_context_modality_by_hand(model, ids, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model([ids, x]).shape == (6, 5)
    assert torch.equal(ids, ids.clone())  # (never written)


class CastingEncoder(nn.Module):
    """Features stored in another dtype, cast by the encoder itself; records what it was given."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return torch.tanh(self.fc(x.float())).mean(1)


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_modality_without_context_takes_features_of_another_dtype(hoist, dtype):
    """context_dims[j] = 0: features in another dtype than the parameters' (stored in half, cast by
    the encoder) go to the encoder as they are, at every step; against the method by hand."""
    torch.manual_seed(0)
    encoders = [CastingEncoder(5, 6), nn.Sequential(nn.Linear(3 + 4, 8), nn.Tanh())]
    model = ProgressiveFusion(encoders, [6, 8], 5, [0, 4], iterations=3, hoist=hoist)
    a, x = torch.randn(6, 9, 5, dtype=dtype), torch.randn(6, 3)
    assert_no_context_modality_by_hand(model, a, x)
    assert len(encoders[0].seen) == 6 and all(seen is a for seen in encoders[0].seen)


@pytest.mark.parametrize("hoist", [True, False])
def test_inputs_made_under_inference_mode_train(hoist):
    """Features of a frozen encoder made under torch.inference_mode: a hoisted first Linear keeps
    x for its backward, where the unhoisted one kept its concat; both train as the model by hand."""
    torch.manual_seed(0)
    model = ProgressiveFusion([nn.Sequential(nn.Linear(5 + 3, 16), nn.ReLU()), PooledMLP(4 + 2, 7)],
                              [16, 7], 8, [3, 2], iterations=2, hoist=hoist)
    assert model.hoisted == ((0, 1) if hoist else ())
    with torch.inference_mode():
        xs = [torch.randn(4, 5), torch.randn(4, 6, 4)]
    reference = copy.deepcopy(model)
    reference.hoist = False
    got = torch.autograd.grad(model(xs).square().sum(), list(model.parameters()))
    want = torch.autograd.grad(reference([x.clone() for x in xs]).square().sum(), list(reference.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_integer_input_of_a_modality_with_context_is_refused_by_name():
    model = ProgressiveFusion([TokenEncoder(20, 6), TokenEncoder(20, 6)], [6, 6], 5, [0, 2])
    ids = torch.randint(0, 20, (6, 9))
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype torch.int64, but context_dims\[1\] = 2"):
        model([ids, ids])


def test_hoisting_notes_say_when_an_encoder_stops_running_hoisted():
    model = ProgressiveFusion([nn.Sequential(nn.Linear(3 + 4, 8), nn.ReLU()), nn.Sequential(nn.Linear(6 + 4, 8), nn.Tanh())],
                              [8, 8], 16, 4, iterations=3)
    assert model.hoisted == (0, 1) and all("hoisted, " in n for n in model.hoisting_notes)
    handle = model.encoders[0][0].register_forward_hook(lambda *args: None)
    assert model.hoisted == (1,)
    assert "encoder 0: not hoisted" in model.hoisting_notes[0] and "hooks" in model.hoisting_notes[0]
    assert "encoder 1: hoisted, tanh fused" == model.hoisting_notes[1]
    handle.remove()
    assert model.hoisted == (0, 1) and model.hoisting_notes[0] == "encoder 0: hoisted, relu fused"
    model.encoders[1][1] = nn.Sigmoid()  # the fused activation replaced
    assert model.hoisted == (0,) and "encoder 1: not hoisted" in model.hoisting_notes[1]
    assert "fused activation was replaced" in model.hoisting_notes[1]
    model.backend = "cpu"
    model.hoist = True
    assert model.hoisting_notes[1] == "encoder 1: hoisted, sigmoid fused"
    # A stale plan (the parameters' dtype changed) is made again when asked, as the next forward would:
    # the notes and `hoisted` agree before that forward.
    model.double()
    assert model.hoisted == (0, 1) and model.hoisting_notes == ("encoder 0: hoisted, relu fused",
                                                                "encoder 1: hoisted, sigmoid fused")
    torch.nn.utils.parametrizations.weight_norm(model.encoders[0][0])
    assert model.hoisted == (1,) and "parametrization" in model.hoisting_notes[0], model.hoisting_notes


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


@pytest.mark.parametrize("hoist", [True, False])
def test_torch_func_grad_of_the_model_equals_autograd_on_the_plain_ops(hoist):
    """torch.func.grad over functional_call (meta-learning, per-sample gradients): `auto` serves the
    calls inside the transform with the plain ops, which the fused backends' autograd cannot."""
    torch.manual_seed(0)
    model = make_model()
    model.hoist = hoist
    reference = make_model(backend="torch")
    reference.load_state_dict(model.state_dict())
    xs = make_inputs()
    params = dict(model.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(model, (p,), (xs,)).square().sum())(params)
    want = torch.autograd.grad(reference(xs).square().sum(), list(reference.parameters()))
    for name, w in zip(params, want):
        torch.testing.assert_close(got[name], w, msg=name)
