"""ProgressiveFusion's hoisting: which encoders it detects, and that the hoisted model is the
unhoisted one (outputs, every gradient, state_dict) on every backend this machine runs, under
autocast, after copies, dtype changes and module swaps, in training and evaluation mode."""
import copy
import io
import random
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pf_kernels as pk
from pf_kernels._dispatch import implements
import pf_kernels.nn as pf_nn
from pf_kernels.nn import ProgressiveFusion, plan_hoisting

BACKENDS = [b for b, info in pk.available_backends().items()
            if info["available"] and ("cpu" in info["devices"] or "*" in info["devices"])] + ["auto"]
# Those that hoist (every backend with context_linear; one without runs its models unhoisted).
HOISTING = [b for b in BACKENDS if implements(b, "context_linear")]


class LastAndMean(nn.Module):
    """(B, T, H) -> (B, 2H): the last step and the mean over steps."""

    def forward(self, h):
        return torch.cat([h[:, -1], h.mean(1)], -1)


class SeriesEncoder(nn.Module):
    """A custom module whose forward begins with self.step(x): hoistable through torch.fx."""

    def __init__(self, d_in, hidden, d_out, dropout=0.0):
        super().__init__()
        self.step = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out = nn.Linear(2 * hidden, d_out)
        self.dropout = dropout

    def forward(self, x):
        h = F.dropout(self.step(x), self.dropout, self.training)  # fx records self.training
        return self.out(torch.cat([h[:, -1], h.mean(1)], -1))


class FunctionalAct(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.first = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.sigmoid(self.first(x)) * 2.0


class Residual(nn.Module):
    """Uses its input twice: not hoistable."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.first = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.first(x) + x.sum(-1, keepdim=True)


class ShapeBranch(nn.Module):
    """An if on a shape: fx cannot trace it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU())

    def forward(self, x):
        y = self.mlp(x)
        return y.flatten(1, -2).mean(1) if y.dim() > 2 else y


class MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("encoder,expected", [
    (nn.Linear(7, 4), "none"),
    (nn.Sequential(nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 4)), "relu"),
    (nn.Sequential(nn.Sequential(nn.Linear(7, 4), nn.Tanh()), nn.Linear(4, 4)), "tanh"),
    (nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(7, 4))), nn.GELU()), "gelu"),
    (nn.Sequential(nn.Linear(7, 4), nn.GELU(approximate="tanh")), "none"),  # not our gelu: stays in the tail
    (SeriesEncoder(7, 4, 3), "gelu"),
    (FunctionalAct(7, 4), "sigmoid"),
    (nn.Sequential(nn.Linear(7, 4), nn.ReLU(inplace=True), LastAndMean()), "relu"),
])
def test_detected_forms(encoder, expected):
    plan = plan_hoisting(encoder, 3)
    assert not isinstance(plan, str), plan
    assert plan.activation == expected


@pytest.mark.parametrize("encoder,reason", [
    (nn.Sequential(nn.Flatten(1), nn.Linear(7, 4)), "something other than one nn.Linear"),
    (Residual(7, 4), "something other than one nn.Linear"),
    (ShapeBranch(7, 4), "torch.fx cannot trace it (TraceError: an if or a loop on a traced value"),
    (MyLinear(7, 4), "something other than one nn.Linear"),
    (nn.Sequential(MyLinear(7, 4), nn.ReLU()), "something other than one nn.Linear"),
    (nn.Linear(3, 4), "3 <= context_dims"),
    (nn.GRU(7, 4, batch_first=True), "torch.fx cannot trace"),
    (nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(7, 4)), nn.ReLU()),
     "its first layer is a ParametrizedLinear, not a plain nn.Linear"),
])
def test_forms_left_alone(encoder, reason):
    plan = plan_hoisting(encoder, 3)
    assert isinstance(plan, str) and reason in plan, plan


class ReadsItsShape(nn.Module):
    """A forward that reads its input's shape besides handing it to its first Linear: a positional
    table sliced to the sequence length, a scale by the width, a mean over the position dims."""

    def __init__(self, d_in, d_out, hidden=12, positions=16):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)  # hidden != d_in: x's width and h's differ
        self.pos = nn.Parameter(torch.randn(positions, hidden))
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x):
        B, T, _ = x.shape
        h = torch.relu(self.fc(x)) + self.pos[:x.size(1)] * x.shape[-1] ** -0.5
        h = h * (x.size(-1) / h.size(dim=2)) + (x.dim() - x.ndim) + torch.zeros((), device=x.device)
        return self.out(h.reshape(B, T * h.shape[-1]).view(x.size()[:1] + (T, -1))).mean(x.dim() - 2)


class ReadsItsDtype(ReadsItsShape):
    def forward(self, x):
        return self.fc(x).to(x.dtype).mean(1)


def test_reads_of_the_input_shape_are_answered_from_the_first_layer():
    # x's leading dims, rank and device are the first Linear's output's; its width is the Linear's
    # in_features (the tail reads x~ = [x, context], whatever the step)
    plan = plan_hoisting(ReadsItsShape(5 + 3, 8), 3)
    assert not isinstance(plan, str) and plan.activation == "relu", plan
    hoisted, plain, xs = pair_with(ReadsItsShape(5 + 3, 8))
    assert hoisted.hoisted == (0, 1), hoisted.hoisting_notes
    for mode in ("train", "eval"):
        getattr(hoisted, mode)(), getattr(plain, mode)()
        assert_same(hoisted, plain, xs, steps=True)
        assert_same(hoisted, plain, [torch.randn(2, 11, 5), torch.randn(2, 4)])  # another length
    assert "other than one nn.Linear" in plan_hoisting(ReadsItsDtype(5 + 3, 8), 3)  # dtype: autocast differs


class UnpacksItsShape(ReadsItsShape):
    def forward(self, x):
        B, T, _ = x.shape
        (width,) = x.shape[2:]
        return self.out(self.fc(x).mean(1)) * (width / (B * T))


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 4, 5), (4, 1, 7, 5)])
def test_unpacking_the_shape_of_an_input_of_another_rank_raises_as_unhoisted(shape):
    # fx traces an unpacking as indexings: without the count checked, (2, 5) raised IndexError and
    # (2, 3, 4, 5) ran where the encoder's own unpacking raises ValueError
    hoisted, plain, xs = pair_with(UnpacksItsShape(5 + 3, 8))
    assert hoisted.hoisted == (0, 1), hoisted.hoisting_notes
    torch.testing.assert_close(hoisted(xs), plain(xs))
    xs = [torch.randn(shape), xs[1]]
    for model in (plain, hoisted):
        with pytest.raises(ValueError, match="values to unpack"):
            model(xs)


class SizeOf(ReadsItsShape):
    def __init__(self, d_in, d_out, dim):
        super().__init__(d_in, d_out)
        self.register_buffer("dim", dim) if isinstance(dim, torch.Tensor) else setattr(self, "dim", dim)

    def forward(self, x):
        return self.out(self.fc(x).mean(1)) * x.size(self.dim)


@pytest.mark.parametrize("dim", [1, -1, 2, torch.tensor(2), torch.tensor([1]), True, slice(0, 2), -4, 3, 2.0])
def test_input_size_reads_take_and_refuse_what_torch_does(dim):
    # the hoisted tail asks torch (on the Linear's output, of the same rank) first: same result or same error
    hoisted, plain, xs = pair_with(SizeOf(5 + 3, 8, dim))
    assert hoisted.hoisted == (0, 1), hoisted.hoisting_notes
    try:
        want = plain(xs)
    except Exception as exc:
        with pytest.raises(type(exc)) as got:
            hoisted(xs)
        assert str(got.value).splitlines()[0] == str(exc).splitlines()[0]
    else:
        torch.testing.assert_close(hoisted(xs), want)


def test_hooks_keep_an_encoder_unhoisted():
    encoder = nn.Sequential(nn.Linear(7, 4), nn.ReLU())
    encoder[0].register_forward_pre_hook(lambda module, args: None)
    assert "hooks" in plan_hoisting(encoder, 3)


def make_encoders(context):
    """Five modalities: hoisted four ways, and one that is not."""
    c = context
    return [nn.Sequential(nn.Linear(5 + c[0], 8), nn.ReLU(), nn.Linear(8, 6)),      # vector
            nn.Linear(3 + c[1], 6),                                              # bare Linear
            SeriesEncoder(4 + c[2], 8, 6),                                       # custom, sequence
            nn.Sequential(nn.Sequential(nn.Linear(2 + c[3], 6), nn.Tanh()), LastAndMean(), nn.Linear(12, 6)),
            nn.Sequential(nn.Flatten(1), nn.Linear(3 * (2 + c[4]), 6))]         # not hoisted


def make_inputs(B=4, dtype=torch.float32):
    return [torch.randn(B, 5, dtype=dtype), torch.randn(B, 3, dtype=dtype), torch.randn(B, 7, 4, dtype=dtype),
            torch.randn(B, 2, 3, 2, dtype=dtype).flatten(1, 2), torch.randn(B, 3, 2, dtype=dtype)]


def unhoisted(model):
    """A copy of model (same weights) that runs without hoisting: the reference it must equal."""
    plain = copy.deepcopy(model)
    plain.hoist = False
    return plain


def make_pair(backend="auto", iterations=3, context=(3, 2, 4, 1, 2), **kwargs):
    torch.manual_seed(0)
    hoisted = ProgressiveFusion(make_encoders(context), [6] * 5, 7, list(context), iterations=iterations,
                                backend=backend, **kwargs)
    plain = unhoisted(hoisted)
    return hoisted, plain


def pair_with(encoder, iterations=3):
    """A model of `encoder` (a sequence modality, 5 features + a context of 3) and a Linear (a vector
    modality), its unhoisted copy, and inputs."""
    torch.manual_seed(0)
    hoisted = ProgressiveFusion([encoder, nn.Linear(4 + 3, 8)], [8, 8], 6, 3, iterations=iterations)
    return hoisted, unhoisted(hoisted), [torch.randn(4, 6, 5), torch.randn(4, 4)]


def assert_same(hoisted, plain, xs, rtol=1e-5, atol=1e-6, steps=False):
    a = hoisted(xs, return_all_steps=steps)
    b = plain(xs, return_all_steps=steps)
    a, b = (torch.stack(a), torch.stack(b)) if steps else (a, b)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    g = torch.randn_like(a)
    grads_a = torch.autograd.grad(a, list(hoisted.parameters()), g, allow_unused=True)
    grads_b = torch.autograd.grad(b, list(plain.parameters()), g, allow_unused=True)
    names = [n for n, _ in hoisted.named_parameters()]
    for name, ga, gb in zip(names, grads_a, grads_b):
        assert (ga is None) == (gb is None), name
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_hoisted_equals_unhoisted(backend, iterations):
    hoisted, plain = make_pair(backend, iterations, context_activation="tanh", fusion_activation="gelu")
    assert plain.hoisted == ()
    expected = (0, 1, 2, 3) if implements(backend, "context_linear") else ()
    assert hoisted.hoisted == expected, hoisted.hoisting_notes
    assert f"hoisted={expected}" in repr(hoisted)
    assert_same(hoisted, plain, make_inputs(), steps=True)


@pytest.mark.parametrize("backend", HOISTING)
def test_mixed_back_projection_activations_and_no_bias(backend):
    hoisted, plain = make_pair(backend, bias=False)
    for model in (hoisted, plain):
        model.back_projections[1].activation = "sigmoid"
        model.back_projections[4].activation = "gelu"
    assert_same(hoisted, plain, make_inputs())


def test_batch_of_zero_and_float64():
    hoisted, plain = make_pair("auto")
    assert hoisted(make_inputs(B=0)).shape == (0, 7)
    hoisted, plain = hoisted.double(), plain.double()
    assert_same(hoisted, plain, make_inputs(dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_state_dict_and_parameters_are_the_unhoisted_models():
    hoisted, plain = make_pair()
    assert list(hoisted.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(hoisted.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert [n for n, _ in hoisted.named_parameters()] == [n for n, _ in plain.named_parameters()]
    other = ProgressiveFusion(make_encoders((3, 2, 4, 1, 2)), [6] * 5, 7, [3, 2, 4, 1, 2], iterations=3)
    other.load_state_dict(plain.state_dict())
    xs = make_inputs()
    torch.testing.assert_close(other(xs), plain(xs), rtol=1e-5, atol=1e-6)


def test_training_and_evaluation_mode():
    """fx records self.training as a constant: each mode runs the tail traced in that mode."""
    torch.manual_seed(0)
    encoders = [SeriesEncoder(4 + 2, 8, 6, dropout=0.5), nn.Linear(3 + 2, 6)]
    hoisted = ProgressiveFusion(encoders, [6, 6], 5, 2, iterations=2)
    plain = unhoisted(hoisted)
    xs = [torch.randn(4, 7, 4), torch.randn(4, 3)]
    hoisted.eval(), plain.eval()
    assert_same(hoisted, plain, xs)
    hoisted.train()
    torch.manual_seed(1)
    first = hoisted(xs)
    torch.manual_seed(2)
    assert not torch.allclose(first, hoisted(xs))  # dropout is on in training mode


@pytest.mark.parametrize("move", ["double", "meta-then-assign"])
def test_a_model_moved_then_compiled_runs_hoisted(move):
    """A plan goes stale when the weights change dtype or device (or arrive by load_state_dict with
    assign=True); it was made again only at an eager forward, so a model moved (`.cuda()`, `.double()`)
    and then compiled traced its stale plans unhoisted, at every call. Moving or loading plans again."""
    import torch._dynamo
    hoisted, plain = make_pair()
    xs, planned = make_inputs(), hoisted.hoisted
    if move == "double":
        hoisted, plain, xs = hoisted.double(), plain.double(), [x.double() for x in xs]
    else:
        state = hoisted.state_dict()
        with torch.device("meta"):
            torch.manual_seed(0)
            hoisted = ProgressiveFusion(make_encoders((3, 2, 4, 1, 2)), [6] * 5, 7, [3, 2, 4, 1, 2], iterations=3)
        hoisted.load_state_dict(state, assign=True)
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(hoisted, backend=backend)(xs)
    torch.testing.assert_close(out, plain(xs), rtol=1e-5, atol=1e-6)
    assert any("refine_step_hoisted" in t or "context_linear" in t for t in targets), sorted(targets)
    assert hoisted.hoisted == planned and planned


def test_copies_dtype_changes_and_module_swaps_are_seen():
    hoisted, plain = make_pair()
    xs = make_inputs()
    copied = copy.deepcopy(hoisted)
    with torch.no_grad():
        copied.encoders[0][2].weight.mul_(2)  # below the hoisted layer, in the copy only
        copied.encoders[2].step[0].weight.mul_(0.5)  # the hoisted layer itself
    plain_copy = copy.deepcopy(copied)
    plain_copy.hoist = False
    assert_same(copied, plain_copy, xs)
    assert_same(hoisted, plain, xs)  # the original is untouched
    # Modules swapped below the first layer are looked up live.
    for model in (hoisted, plain):
        torch.manual_seed(3)
        model.encoders[0][2] = nn.Linear(8, 6)
    assert_same(hoisted, plain, xs)
    # Replacing a hoisted first layer: that encoder runs unhoisted until the model plans again.
    for model in (hoisted, plain):
        torch.manual_seed(4)
        model.encoders[2].step[0] = nn.Linear(8, 8)
    assert hoisted.hoisted == (0, 1, 3)
    assert_same(hoisted, plain, xs)
    hoisted.hoist = True
    assert hoisted.hoisted == (0, 1, 2, 3)
    assert_same(hoisted, plain, xs)
    # Pickled whole and back.
    buffer = io.BytesIO()
    torch.save(hoisted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.hoisted == hoisted.hoisted
    torch.testing.assert_close(loaded(xs), hoisted(xs))


def test_hoist_switch_and_notes():
    hoisted, _ = make_pair()
    assert hoisted.hoist is True and len(hoisted.hoisting_notes) == 5
    assert "not hoisted" in hoisted.hoisting_notes[4] and "relu fused" in hoisted.hoisting_notes[0]
    hoisted.hoist = False
    assert hoisted.hoisted == () and all("hoist=False" in n for n in hoisted.hoisting_notes)
    hoisted.hoist = True
    assert hoisted.hoisted == (0, 1, 2, 3)
    with pytest.raises(TypeError, match="hoist"):
        hoisted.hoist = 1


def test_hoisted_path_calls_context_linear_not_backproj_concat(monkeypatch):
    hoisted, _ = make_pair("auto")
    calls = []
    for name in ("context_linear", "backproj_concat", "refine_step"):
        original = getattr(pk.ops, name)
        monkeypatch.setattr(pk.ops, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    hoisted(make_inputs())
    # 2 refinements: 4 hoisted modalities each; the unhoisted one through refine_step.
    assert calls.count("context_linear") == 8 and calls.count("refine_step") == 2


def test_a_linear_of_the_wrong_width_fails_with_the_widths_named():
    model = ProgressiveFusion([nn.Sequential(nn.Linear(5 + 2, 4), nn.ReLU())], [4], 3, 2)
    assert model.hoisted == (0,)
    with pytest.raises(ValueError, match=r"6 features and context_dims\[0\] = 2, but the first Linear .* takes 7"):
        model([torch.randn(2, 6)])  # 6 + 2 features for a Linear that takes 7


@pytest.mark.parametrize("backend", [b for b in HOISTING if b != "torch"])
def test_trains_under_autocast_like_the_unhoisted_model(backend):
    hoisted, plain = make_pair(backend, context_activation="tanh")
    xs = make_inputs(8)
    outs = []
    for model in (hoisted, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model(xs)
        assert z.dtype == torch.bfloat16
        z.float().square().mean().backward()
        outs.append(z.float())
    torch.testing.assert_close(outs[0], outs[1], rtol=3e-2, atol=3e-2)
    for (name, a), b in zip(hoisted.named_parameters(), plain.parameters()):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-3, msg=name)


class WritesInPlace(nn.Module):
    """Writes into its input: a tail that begins with it must not overwrite the kept projection."""

    def forward(self, h):
        return h.mul_(0.5)


@pytest.mark.parametrize("backend", HOISTING)
@pytest.mark.parametrize("after_linear", [lambda: nn.LeakyReLU(0.1, inplace=True), lambda: nn.ELU(inplace=True),
                                          lambda: nn.Dropout(0.3, inplace=True), WritesInPlace,
                                          lambda: nn.LayerNorm(8)])
def test_a_tail_writing_into_its_input_leaves_the_projection_alone(backend, after_linear):
    # No activation is fused here, so step 1's input would be the projection kept for the later steps.
    torch.manual_seed(0)
    encoders = [nn.Sequential(nn.Linear(5 + 3, 8), after_linear(), nn.Linear(8, 6), LastAndMean()),
                nn.Sequential(nn.Linear(4 + 3, 8), after_linear(), nn.Linear(8, 6), LastAndMean())]
    hoisted = ProgressiveFusion(encoders, [12, 12], 5, 3, iterations=3, backend=backend)
    plain = unhoisted(hoisted)
    assert hoisted.hoisted == (0, 1), hoisted.hoisting_notes
    # A LayerNorm reads its input and returns a new tensor: no copy is made for it.
    assert hoisted._hoisting[0].fresh_first_input == (not isinstance(encoders[0][1], nn.LayerNorm))
    xs = [torch.randn(4, 6, 5), torch.randn(4, 5, 4)]
    torch.manual_seed(1)  # the same dropout masks on both
    a = hoisted(xs)
    torch.manual_seed(1)
    b = plain(xs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hooks_added_after_construction_run_the_encoder_unhoisted():
    hoisted, plain = make_pair()
    calls = {"hoisted": 0, "plain": 0}
    for name, model in (("hoisted", hoisted), ("plain", plain)):
        model.encoders[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
        model.encoders[2].step[0].register_forward_hook(
            lambda module, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
    assert hoisted.hoisted == (1, 3)
    assert_same(hoisted, plain, make_inputs())
    assert calls["hoisted"] == calls["plain"] == 3


def test_a_global_forward_hook_runs_every_encoder_unhoisted():
    hoisted, plain = make_pair()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(module))
    try:
        assert hoisted.hoisted == ()
        hoisted(make_inputs())
        assert any(m is hoisted.encoders[2] for m in seen)
    finally:
        handle.remove()
    assert hoisted.hoisted == (0, 1, 2, 3)


class Scaled(nn.Module):
    """Reads plain attributes in its forward (fx holds their values as constants in the trace)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.out = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)
        self.temperature = 1.0

    def forward(self, x):
        return (self.out(torch.relu(self.fc(x))) / self.temperature).mean(1)


def test_an_attribute_reassigned_after_planning_is_seen():
    torch.manual_seed(0)
    hoisted = ProgressiveFusion([Scaled(5 + 3, 8), Scaled(4 + 3, 8)], [8, 8], 6, 3, iterations=3)
    plain = unhoisted(hoisted)
    xs = [torch.randn(4, 6, 5), torch.randn(4, 6, 4)]
    for temperature in (0.1, 3.0):
        for model in (hoisted, plain):
            for encoder in model.encoders:
                encoder.temperature = temperature
        assert_same(hoisted, plain, xs)
        assert hoisted.hoisted == (0, 1)  # planned again, from the new values


class StoresFeatures(nn.Module):
    """Sets an attribute in its forward: a trace would run that once, with proxies."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.out = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)
        self.features = None

    def forward(self, x):
        self.features = torch.relu(self.fc(x))
        return self.out(self.features).mean(1)


def test_an_encoder_that_sets_attributes_is_not_hoisted_and_keeps_its_own():
    torch.manual_seed(0)
    model = ProgressiveFusion([StoresFeatures(5 + 3, 8), nn.Linear(4 + 3, 8)], [8, 8], 6, 3, iterations=2)
    assert model.hoisted == (1,)
    assert "sets attributes (features)" in model.hoisting_notes[0]
    assert model.encoders[0].features is None  # not a proxy left by the trace
    torch.save(model, io.BytesIO())
    model([torch.randn(4, 6, 5), torch.randn(4, 4)])
    assert isinstance(model.encoders[0].features, torch.Tensor)


class InnerMLP(nn.Module):
    """A module of the user's own whose forward starts with its Linear; reads a plain attribute."""

    def __init__(self, d_in, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden)
        self.scale = 1.0

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))) * self.scale


class WrapsMLP(nn.Module):
    def __init__(self, d_in, hidden, depth=1, pool=True):
        super().__init__()
        self.mlp = InnerMLP(d_in, hidden) if depth == 1 else WrapsMLP(d_in, hidden, depth - 1, pool=False)
        self.drop = nn.Dropout(0.3)
        self.pool = pool

    def forward(self, x):
        h = self.drop(self.mlp(x))
        return h.mean(1) if self.pool else h


@pytest.mark.parametrize("depth", [1, 2])
def test_a_linear_inside_the_users_own_modules_is_hoisted(depth):
    torch.manual_seed(0)
    hoisted = ProgressiveFusion([WrapsMLP(5 + 3, 8, depth), nn.Linear(4 + 3, 8)], [8, 8], 6, 3, iterations=3)
    plain = unhoisted(hoisted)
    assert hoisted.hoisted == (0, 1) and "gelu fused" in hoisted.hoisting_notes[0], hoisted.hoisting_notes
    xs = [torch.randn(4, 6, 5), torch.randn(4, 4)]
    for mode in ("train", "eval"):
        for model in (hoisted, plain):
            getattr(model, mode)()
        torch.manual_seed(1)  # the same dropout masks on both
        a = hoisted(xs)
        torch.manual_seed(1)
        b = plain(xs)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def inner(model):
        return model.encoders[0].mlp if depth == 1 else model.encoders[0].mlp.mlp

    # An attribute of the traced-through module reassigned: planned again from its new value.
    for model in (hoisted, plain):
        inner(model).scale = 3.0
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)
    # The inner module in another mode than its encoder (its trace is the encoder's mode): unhoisted.
    for model in (hoisted, plain):
        inner(model).train(not model.encoders[0].training)
    assert hoisted.hoisted == (1,)
    assert_same(hoisted, plain, xs)
    # The traced-through module swapped for another: unhoisted until planned again.
    torch.manual_seed(5)
    replacement = InnerMLP(8, 8)
    for model in (hoisted, plain):
        model.encoders[0].mlp = copy.deepcopy(replacement)
    assert hoisted.hoisted == (1,)
    assert_same(hoisted, plain, xs)


def test_a_sequential_grown_after_planning_is_planned_again():
    hoisted, plain = make_pair()
    for model in (hoisted, plain):
        model.encoders[0].append(nn.Tanh())
    assert_same(hoisted, plain, make_inputs())
    assert hoisted.hoisted == (0, 1, 2, 3)


class LoopsOverLayers(nn.Module):
    """Loops over a ModuleList (fx unrolls it) and reads a config dict (fx holds its value)."""

    def __init__(self, d_in, hidden):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden)])
        self.cfg = {"scale": 1.0, "shift": [0.0]}

    def forward(self, x):
        h = torch.relu(self.fc(x))
        for layer in self.layers:
            h = layer(h)
        return (h * self.cfg["scale"] + self.cfg["shift"][0]).mean(1)


def test_a_list_grown_or_a_config_changed_in_place_is_planned_again():
    hoisted, plain, xs = pair_with(LoopsOverLayers(5 + 3, 8))
    assert hoisted.hoisted == (0, 1)
    assert_same(hoisted, plain, xs)
    torch.manual_seed(1)
    extra = nn.Linear(8, 8)
    for model in (hoisted, plain):
        model.encoders[0].layers.append(copy.deepcopy(extra))
    assert_same(hoisted, plain, xs)
    for model in (hoisted, plain):
        model.encoders[0].cfg["scale"] = 3.0
    assert_same(hoisted, plain, xs)
    for model in (hoisted, plain):
        model.encoders[0].cfg["shift"][0] = 0.5
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)


@pytest.mark.parametrize("where", ["encoder", "first Linear"])
@pytest.mark.parametrize("kind", ["backward", "backward_pre", "forward set on the instance"])
def test_backward_hooks_and_instance_forwards_run_the_encoder_unhoisted(where, kind):
    hoisted, plain = make_pair()
    calls = {"hoisted": 0, "plain": 0}
    for name, model in (("hoisted", hoisted), ("plain", plain)):
        target = model.encoders[0] if where == "encoder" else model.encoders[0][0]

        def count(name=name):
            calls[name] += 1
        if kind == "backward":  # scales the gradient: skipping it changes every gradient
            target.register_full_backward_hook(
                lambda m, gi, go, count=count: (count(), tuple(None if g is None else 2 * g for g in gi))[1])
        elif kind == "backward_pre":
            target.register_full_backward_pre_hook(lambda m, go, count=count: (count(), tuple(2 * g for g in go))[1])
        else:
            original = target.forward
            target.forward = lambda x, original=original, count=count: (count(), 0.5 * original(x))[1]
    assert hoisted.hoisted == (1, 2, 3)
    xs = make_inputs()
    assert_same(hoisted, plain, xs)
    assert calls["hoisted"] == calls["plain"] > 0
    plan = plan_hoisting(hoisted.encoders[0], 3)
    assert isinstance(plan, str) and "hooks or a forward of its own" in plan


class Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = 1.0

    def forward(self, h):
        return h.mean(1)


class ReadsAChildsAttribute(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.pool = nn.Linear(d_in, d_out), Pool()

    def forward(self, x):
        return self.pool(torch.tanh(self.fc(x))) / self.pool.temperature


def test_an_attribute_of_a_child_read_by_the_forward_is_watched():
    hoisted, plain, xs = pair_with(ReadsAChildsAttribute(5 + 3, 8))
    for temperature in (1.0, 4.0):
        for model in (hoisted, plain):
            model.encoders[0].pool.temperature = temperature
        assert_same(hoisted, plain, xs)
        assert hoisted.hoisted == (0, 1)


class Options:
    __slots__ = ("scale",)

    def __init__(self):
        self.scale = 1.0


class ReadsConfigs(nn.Module):
    """Reads a slotted object and a value three objects deep."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.slotted = Options()
        self.cfg = types.SimpleNamespace(model=types.SimpleNamespace(opt=types.SimpleNamespace(shift=0.0)))

    def forward(self, x):
        return (self.fc(x) * self.slotted.scale + self.cfg.model.opt.shift).mean(1)


def test_configs_changed_in_place_are_seen_in_slots_and_three_objects_deep():
    hoisted, plain, xs = pair_with(ReadsConfigs(5 + 3, 8))
    for model in (hoisted, plain):
        model.encoders[0].slotted.scale = 3.0
    assert_same(hoisted, plain, xs)
    for model in (hoisted, plain):
        model.encoders[0].cfg.model.opt.shift = 0.5
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)


class NoGradGate(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.gate = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        h = self.fc(x)
        with torch.no_grad():
            w = torch.sigmoid(self.gate(h))
        return (h * w).mean(1)


class LayerDrop(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.block = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.training and random.random() < 0.5:
            return h.mean(1)
        return self.block(h).mean(1)


class CachesFeatures(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.cache = []

    def forward(self, x):
        h = torch.relu(self.fc(x))
        self.cache.append(h.detach())
        return h.mean(1)


class TogglesTraining(nn.Module):
    """A train() of the user's own that freezes a layer in evaluation mode."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.head = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def train(self, mode=True):
        super().train(mode)
        self.head.requires_grad_(mode)
        return self

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def test_planning_leaves_a_train_override_in_the_encoders_mode():
    encoder = TogglesTraining(5 + 2, 4).train()
    model = ProgressiveFusion([encoder, nn.Linear(5, 4)], [4, 4], 5, 2)
    assert model.hoisted == (0, 1) and encoder.training and encoder.head.weight.requires_grad


def test_inputs_of_another_batch_size_or_dtype_are_named():
    hoisted, _ = make_pair()
    xs = make_inputs()
    with pytest.raises(ValueError, match=r"xs\[2\] has batch size 3"):
        hoisted([*xs[:2], xs[2][:3], *xs[3:]])
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype torch.float64 but the model's parameters are "
                                        r"torch.float32"):
        hoisted([xs[0], xs[1].double(), *xs[2:]])
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        hoisted.iterations = 0


class NoGradForward(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    @torch.no_grad()
    def forward(self, x):
        return torch.relu(self.fc(x)).mean(1)


class WithInAHelper(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.score = nn.Linear(d_in, d_out), nn.Linear(d_out, 1)

    def _pool(self, h):
        with torch.no_grad():
            w = torch.softmax(self.score(h), 1)
        return (w * h).sum(1)

    def forward(self, x):
        return self._pool(torch.tanh(self.fc(x)))


class TorchLayerDrop(LayerDrop):
    def forward(self, x):  # (its own code: the code is what planning reads)
        h = torch.relu(self.fc(x))
        if self.training and torch.empty(1).uniform_() < 0.5:
            return h.mean(1)
        return self.block(h).mean(1)


class Checkpointed(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.block = nn.Linear(d_in, d_out), nn.Sequential(nn.Linear(d_out, d_out), nn.GELU())

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False).mean(1)


class ConstantScale(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return (self.fc(x) * torch.linspace(0.5, 1.5, self.fc.out_features)).mean(1)


class AddsInPlaceToAView(nn.Module):
    """`h += pos` after taking a view of h: fx records the += out of place, the view would miss it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.pos = nn.Linear(d_in, d_out), nn.Parameter(torch.randn(6, d_out))

    def forward(self, x):
        h = self.fc(x)
        first = h[:, 0]
        h += self.pos
        return first + h.mean(1)


class UnwrapsTuples(nn.Module):
    """Tests a type: a trace passes a proxy, so the branch taken would be kept."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.block = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        y = self.block(torch.relu(self.fc(x)))
        if isinstance(y, torch.Tensor):
            y = 2.0 * y
        return y.mean(1)


class ReadsABufferAsANumber(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, x):
        return torch.softmax(self.fc(x) / float(self.temperature), -1).mean(1)


@pytest.mark.parametrize("encoder,reason", [
    (NoGradGate, "with-block"), (LayerDrop, "random"), (CachesFeatures, "sets attributes (cache)"),
    (NoGradForward, "is decorated"), (WithInAHelper, "WithInAHelper._pool has a with-block"),
    (TorchLayerDrop, "draws random numbers (uniform_"), (Checkpointed, "uses checkpoint"),
    (ConstantScale, "makes tensors of constants"), (AddsInPlaceToAView, "assigns in place (+="),
    (UnwrapsTuples, "tests types (isinstance"), (ReadsABufferAsANumber, "torch.fx cannot trace it")])
def test_forwards_a_trace_cannot_replay_are_not_hoisted(encoder, reason):
    torch.manual_seed(0)
    hoisted = ProgressiveFusion([encoder(5 + 3, 8), nn.Linear(4 + 3, 8)], [8, 8], 6, 3, iterations=3)
    assert hoisted.hoisted == (1,) and reason in hoisted.hoisting_notes[0]
    if encoder is CachesFeatures:
        assert hoisted.encoders[0].cache == []  # the trace's proxies taken out again
    plain = unhoisted(hoisted)
    xs = [torch.randn(4, 6, 5), torch.randn(4, 4)]
    outputs = []
    for model in (hoisted, plain):
        random.seed(3)
        torch.manual_seed(3)
        outputs.append(model(xs))
    torch.testing.assert_close(*outputs, rtol=1e-5, atol=1e-6)


class ReadsTorchModuleAttributes(nn.Module):
    """Reads a torch module's attribute (a dropout schedule) and the parameters' dtype (HF style)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.drop = nn.Linear(d_in, d_out), nn.Dropout(0.5)

    @property
    def dtype(self):
        return self.fc.weight.dtype

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return F.dropout(h, self.drop.p, self.training).mean(1).to(self.dtype)


def test_torch_modules_attributes_and_the_parameters_dtype_are_watched():
    hoisted, plain, xs = pair_with(ReadsTorchModuleAttributes(5 + 3, 8))
    for model in (hoisted, plain):
        model.encoders[0].drop.p = 0.0  # training mode, but nothing dropped now
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)
    hoisted.double()
    plain.double()
    assert_same(hoisted, plain, [x.double() for x in xs])
    assert hoisted.hoisted == (0, 1)


def test_only_the_encoder_whose_attribute_changed_is_planned_again(monkeypatch):
    torch.manual_seed(0)
    hoisted = ProgressiveFusion([Scaled(5 + 3, 8), Scaled(4 + 3, 8)], [8, 8], 6, 3, iterations=3)
    planned = []
    original = pf_nn.plan_hoisting
    monkeypatch.setattr(pf_nn, "plan_hoisting", lambda e, c: (planned.append(e), original(e, c))[1])
    hoisted.encoders[1].temperature = 2.0
    hoisted([torch.randn(4, 6, 5), torch.randn(4, 6, 4)])
    assert planned == [hoisted.encoders[1]] and hoisted.hoisted == (0, 1)


class ReadsABuffer(nn.Module):
    """A buffer in tensor arithmetic: the trace reads it live (a get_attr), so it stays hoisted."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.register_buffer("scale", torch.ones(d_out))

    def forward(self, x):
        return (torch.relu(self.fc(x)) * self.scale).mean(1)


def test_buffers_are_read_live_after_fill_and_load_state_dict():
    hoisted, plain, xs = pair_with(ReadsABuffer(5 + 3, 8))
    for model in (hoisted, plain):
        model.encoders[0].scale.fill_(3.0)
    assert_same(hoisted, plain, xs)
    state = plain.state_dict()
    state["encoders.0.scale"] = torch.randn(8)
    for model in (hoisted, plain):
        model.load_state_dict(state)
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)


SCALE = 1.0


class ReadsAGlobalAndAClassAttribute(nn.Module):
    shift = 0.0

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return (torch.tanh(self.fc(x)) * SCALE + self.shift).mean(1)


def test_globals_and_class_attributes_the_forward_reads_are_watched(monkeypatch):
    hoisted, plain, xs = pair_with(ReadsAGlobalAndAClassAttribute(5 + 3, 8))
    monkeypatch.setattr(ReadsAGlobalAndAClassAttribute, "shift", 0.5)
    assert_same(hoisted, plain, xs)
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    assert_same(hoisted, plain, xs)
    for model in (hoisted, plain):
        model.encoders[0].shift = -1.0  # an instance attribute that shadows the class's
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)
    # Copies refer to the same globals and classes (a Python module can be neither copied nor pickled).
    copies = [copy.deepcopy(hoisted), torch.load(_pickled(hoisted), weights_only=False)]
    assert [c.hoisted for c in copies] == [(0, 1)] * 2
    monkeypatch.setitem(globals(), "SCALE", 2.0)
    for copied in copies:
        torch.testing.assert_close(copied(xs), plain(xs), rtol=1e-5, atol=1e-6)
        assert copied.hoisted == (0, 1)


def _pickled(model) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_a_child_replaced_by_another_is_planned_again():
    hoisted, plain, xs = pair_with(ReadsAChildsAttribute(5 + 3, 8))
    for model in (hoisted, plain):
        model.encoders[0].pool = Pool()
        model.encoders[0].pool.temperature = 4.0
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)


def test_a_fused_activations_attribute_changed_is_planned_again():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5 + 3, 8), nn.GELU(), nn.Linear(8, 8), Pool())
    hoisted, plain, xs = pair_with(encoder)
    assert "gelu fused" in hoisted.hoisting_notes[0]
    for model in (hoisted, plain):
        model.encoders[0][1].approximate = "tanh"  # not our gelu: no longer fused
    xs[0] = 3 * xs[0]
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1) and "none fused" in hoisted.hoisting_notes[0]


def test_a_parametrization_registered_later_runs_the_encoder_unhoisted():
    from torch.nn.utils import parametrize

    class CountingScale(nn.Module):
        calls = 0

        def forward(self, weight):
            CountingScale.calls += 1
            return 0.5 * weight

    hoisted, plain, xs = pair_with(nn.Sequential(nn.Linear(5 + 3, 8), nn.ReLU(), nn.Linear(8, 8), Pool()))
    for model in (hoisted, plain):
        parametrize.register_parametrization(model.encoders[0][0], "weight", CountingScale())
    assert hoisted.hoisted == (1,)
    CountingScale.calls = 0
    assert_same(hoisted, plain, xs)
    assert CountingScale.calls == 2 * 3  # once per step in each model, as the encoder calls it


SETTINGS = types.ModuleType("user_settings")  # a module of the user's, imported whole
SETTINGS.scale = 1.0
ACTIVATION = torch.tanh


class ReadsThroughItsOwnCode(nn.Module):
    """Values reached through a property, a classmethod, a module imported whole and a global
    function, and an optional buffer registered as None: the trace holds each."""
    factor = 1.0

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.register_buffer("mask", None)

    @property
    def gain(self):
        return SETTINGS.scale

    @classmethod
    def shift(cls):
        return cls.factor

    def forward(self, x):
        h = ACTIVATION(self.fc(x)) * self.gain + self.shift()
        if self.mask is not None:
            h = h * self.mask
        return h.mean(1)


def test_values_reached_through_properties_modules_and_optional_buffers_are_watched(monkeypatch):
    hoisted, plain, xs = pair_with(ReadsThroughItsOwnCode(5 + 3, 8))
    mask = torch.randn(8)
    for change in (lambda: monkeypatch.setattr(SETTINGS, "scale", 2.0),
                   lambda: monkeypatch.setattr(ReadsThroughItsOwnCode, "factor", -1.0),
                   lambda: monkeypatch.setitem(globals(), "ACTIVATION", torch.sigmoid),
                   lambda: [setattr(m.encoders[0], "mask", mask.clone()) for m in (hoisted, plain)]):
        change()
        assert_same(hoisted, plain, xs)
        assert hoisted.hoisted == (0, 1)


class ScaledByGradMode(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return (h if torch.is_grad_enabled() else 2 * h).mean(1)


class CountsSteps(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.state = types.SimpleNamespace(step=0)

    def forward(self, x):
        self.state.step = self.state.step + 1
        return torch.relu(self.fc(x)).mean(1) * self.state.step


class Base(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        y = torch.relu(self.fc(x)).mean(1)
        return 2 * y if isinstance(y, torch.Tensor) else y


class CallsSuper(Base):
    def forward(self, x):
        return super().forward(x) + 1.0


class ReadsAChildsMode(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.drop = nn.Linear(d_in, d_out), nn.Dropout(0.0)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return (h * 2 if self.drop.training else h).mean(1)


@pytest.mark.parametrize("encoder,reason", [
    (ScaledByGradMode, "reads global state (is_grad_enabled"), (CountsSteps, "CountsSteps.forward sets attributes (step)"),
    (CallsSuper, "Base.forward tests types")])
def test_forwards_that_read_global_state_write_objects_or_call_super_are_read(encoder, reason):
    torch.manual_seed(0)
    model = ProgressiveFusion([encoder(5 + 3, 8), nn.Linear(4 + 3, 8)], [8, 8], 6, 3, iterations=3)
    assert model.hoisted == (1,) and reason in model.hoisting_notes[0], model.hoisting_notes
    if encoder is CountsSteps:
        assert model.encoders[0].state.step == 0  # read before any trace ran the forward
    plain = unhoisted(model)
    xs = [torch.randn(4, 6, 5), torch.randn(4, 4)]
    with torch.no_grad():
        torch.testing.assert_close(model(xs), plain(xs), rtol=1e-5, atol=1e-6)


def test_a_child_whose_mode_the_forward_reads_must_be_in_the_encoders_mode():
    hoisted, plain, xs = pair_with(ReadsAChildsMode(5 + 3, 8))
    assert hoisted.hoisted == (0, 1)
    for model in (hoisted, plain):
        model.encoders[0].drop.eval()  # the encoder itself stays in training mode
    assert hoisted.hoisted == (1,)
    assert_same(hoisted, plain, xs)


class Config:  # a class used as a config namespace
    scale = 1.0


class ReadsAConfigClassAndAHelper(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.norm = nn.Linear(d_in, d_out), nn.BatchNorm1d(6)
        self.p = 0.0

    def pool(self, h):
        return h.mean(1)

    def forward(self, x):
        h = F.dropout(torch.relu(self.fc(x)), self.p, self.training)  # reads its own mode only
        return self.pool(self.norm(h) * Config.scale)


def test_config_classes_patched_methods_and_copies_made_elsewhere(monkeypatch):
    hoisted, plain, xs = pair_with(ReadsAConfigClassAndAHelper(5 + 3, 8))
    for model in (hoisted, plain):
        model.encoders[0].norm.eval()  # a frozen child, called live: the plan still holds
    assert hoisted.hoisted == (0, 1)
    monkeypatch.setattr(Config, "scale", 2.0)
    assert_same(hoisted, plain, xs)
    monkeypatch.setattr(ReadsAConfigClassAndAHelper, "pool", lambda self, h: h.amax(1))
    assert_same(hoisted, plain, xs)
    assert hoisted.hoisted == (0, 1)
    # A copy loaded where the config differs from what its tails were traced with plans again.
    saved = _pickled(hoisted)
    monkeypatch.setattr(Config, "scale", 5.0)
    loaded = torch.load(saved, weights_only=False)
    torch.testing.assert_close(loaded(xs), plain(xs), rtol=1e-5, atol=1e-6)


class HalvesAScaleEachLayer(nn.Module):
    """An in-place operator on a Python number (not a traced tensor): the trace replays it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.layers = nn.Linear(d_in, d_out), nn.ModuleList(nn.Linear(d_out, d_out) for _ in range(2))

    def forward(self, x):
        h, scale = torch.relu(self.fc(x)), 1.0
        for layer in self.layers:
            h = h + scale * layer(h)
            scale *= 0.5
        return h.mean(1)


def test_an_in_place_operator_on_a_number_keeps_the_encoder_hoisted():
    hoisted, plain, xs = pair_with(HalvesAScaleEachLayer(5 + 3, 8))
    assert hoisted.hoisted == (0, 1)
    assert_same(hoisted, plain, xs)


# ---- forms a trace would replay wrongly, found by a probe (each hoisted, and differed, before) ----
LOG, STATS = [], {}


class LogsToAGlobal(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        h = torch.relu(self.fc(x)).mean(1)
        LOG.append(h.detach())
        return h


class SetsAGlobalEntry(LogsToAGlobal):
    def forward(self, x):
        h = torch.relu(self.fc(x)).mean(1)
        STATS["mean"] = h.detach().mean()
        return h


class DrawsFromAGenerator(LogsToAGlobal):
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.rng = random.Random(0)

    def forward(self, x):
        return torch.relu(self.fc(x)).mean(1) * self.rng.uniform(0.5, 1.5)


class CallsAChildsForward(LogsToAGlobal):
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop.forward(torch.relu(self.fc(x))).mean(1)


class HoldsALambda(LogsToAGlobal):
    def __init__(self, d_in, d_out, post=lambda h: h * 2):
        super().__init__(d_in, d_out)
        self.post = post

    def forward(self, x):
        return self.post(torch.relu(self.fc(x))).mean(1)


@pytest.mark.parametrize("encoder,reason", [
    (LogsToAGlobal(8, 8), "changes a global container (LOG)"),
    (SetsAGlobalEntry(8, 8), "changes a global container (STATS)"),
    (DrawsFromAGenerator(8, 8), "draws random numbers (uniform"),
    (CallsAChildsForward(8, 8), "calls a module's forward directly (drop.forward"),
    (HoldsALambda(8, 8), "HoldsALambda.post is a function of your own the instance holds"),
])
def test_forms_a_trace_would_replay_wrongly_are_not_hoisted(encoder, reason):
    LOG.clear(), STATS.clear()
    plan = plan_hoisting(encoder, 3)
    assert isinstance(plan, str) and reason in plan, plan
    assert LOG == [] and STATS == {}  # (a trace wrote proxies into them)


def test_a_library_function_held_by_the_instance_keeps_it_hoisted():
    assert not isinstance(plan_hoisting(HoldsALambda(8, 8, post=torch.tanh), 3), str)


class LoopsOverParameters(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.mixes = nn.ParameterList([nn.Parameter(torch.randn(d_out, d_out) * 0.1)])
        self.out = nn.Linear(d_out, d_out)
        self.layers = nn.ModuleList([nn.Dropout(0.5), nn.Identity()])

    def forward(self, x):
        h = torch.relu(self.fc(x))
        for w in self.mixes:
            h = h + h @ w
        for layer in self.layers:  # a child's mode read through a loop variable
            h = h * 2 if layer.training else h
        if self.out.bias is not None:  # a parameter of a child the trace does not go through
            h = h + self.out.bias
        return h.mean(1)


def test_a_parameter_list_grown_a_child_bias_removed_or_a_mode_read_in_a_loop_are_seen():
    hoisted, plain, xs = pair_with(LoopsOverParameters(5 + 3, 8))
    assert hoisted.hoisted == (0, 1), hoisted.hoisting_notes
    for model in (hoisted, plain):
        model.eval()
    assert_same(hoisted, plain, xs, steps=True)
    grown = nn.Parameter(torch.randn(8, 8) * 0.1)
    for model in (hoisted, plain):
        model.encoders[0].mixes.append(grown)  # the trace had unrolled the loop over one
    assert_same(hoisted, plain, xs, steps=True)
    assert hoisted.hoisted == (0, 1)
    for model in (hoisted, plain):
        model.encoders[0].out.bias = None
    assert_same(hoisted, plain, xs, steps=True)
    for model in (hoisted, plain):
        model.encoders[0].layers[1].train()  # the encoder in eval, one child in train
    assert_same(hoisted, plain, xs, steps=True)
    assert hoisted.hoisted == (1,) and "mode" in hoisted.hoisting_notes[0]


def test_a_lazy_first_layer_is_named_and_hoisted_once_planned_again():
    torch.manual_seed(0)
    model = ProgressiveFusion([nn.Sequential(nn.LazyLinear(8), nn.ReLU()), nn.Linear(3 + 2, 8)], [8, 8], 6, 2)
    assert "LazyLinear, not initialised yet (set hoist = True after the first forward" in model.hoisting_notes[0]
    xs = [torch.randn(4, 5), torch.randn(4, 3)]
    before = model(xs)
    model.hoist = True
    assert model.hoisted == (0, 1)
    torch.testing.assert_close(model(xs), before, rtol=1e-5, atol=1e-6)
