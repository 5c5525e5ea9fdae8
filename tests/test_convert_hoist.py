"""convert() hoisting x's projection out of a plain progressive model's unrolled steps (DESIGN §7,
issue 14): linear(cat([x, broadcast(act(linear(z)))])) -> context_linear(p, z, ...), with
p = linear(x, W[:, :Dx], b) made once per modality and shared by every step (the first step's
cat([x, zeros]) is p itself). Outputs and every gradient equal the unconverted model's."""
import copy

import pytest
import torch
from torch import nn

import pf_kernels as pk
from pf_kernels.convert.rewrite import FusedCalls
from pf_kernels.convert import count_fused_calls
from tests.convert_cases import fresh_dynamo  # noqa: F401  (a fixture)
from tests.convert_cases import assert_same_model, cpu_backends, ops_calls

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
BACKENDS = [b for b in ("torch", "cpu") if b in cpu_backends()]


class Reused(nn.Module):
    """An activation that does not alone read the Linear's output: nothing to fuse."""

    def forward(self, h):
        return torch.relu(h) + 0.5 * h


class PlainProgressive(nn.Module):
    """Progressive Fusion written by hand: encoder j is Linear(Dx + Dc, H), an activation, Linear(H, E)
    over cat([x, context]) (the context broadcast over a sequence's positions), the mean over
    positions; a ReLU head over the encoders' outputs; relu(Linear(z)) back-projections; step 1 sees
    zeros. reverse: cat([context, x]). vary_x: each step reads its own x (x * step), nothing shared.
    retake: each step takes x again, as a slice and a cast (modalities as column groups of one
    tensor); write_between: with a write into the input between the steps."""

    def __init__(self, dims=(6, 5, 4), contexts=(3, 2, 4), hidden=8, out=7, fused=5, steps=3,
                 activation=nn.ReLU, bias=True, reverse=False, vary_x=False, zeros="new_zeros", retake=False,
                 write_between=False):
        super().__init__()
        self.contexts, self.steps, self.reverse, self.vary_x = contexts, steps, reverse, vary_x
        self.zeros, self.retake, self.write_between = zeros, retake, write_between
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d + c, hidden, bias=bias), activation(), nn.Linear(hidden, out))
            for d, c in zip(dims, contexts))
        self.head = nn.Linear(out * len(dims), fused)
        self.back = nn.ModuleList(nn.Linear(fused, c) for c in contexts)

    def forward(self, xs):
        z = xs[0].new_zeros(xs[0].shape[0], self.head.out_features) if self.zeros == "z0" else None
        for step in range(self.steps):
            hs = []
            for j, x in enumerate(xs):
                if self.vary_x:
                    x = x * (step + 1)
                if self.retake:
                    if self.write_between and step == 1:
                        x.mul_(1.0)
                    x = x[..., 0:x.shape[-1]].float()
                if z is None and self.zeros == "repeat":
                    context = torch.zeros_like(x[..., :1]).repeat(*[1] * (x.dim() - 1), self.contexts[j])
                elif z is None and self.zeros == "expand":
                    context = x.new_zeros(x.shape[0], *[1] * (x.dim() - 2), self.contexts[j]).expand(
                        *x.shape[:-1], -1)
                elif z is None:
                    context = x.new_zeros(*x.shape[:-1], self.contexts[j])
                else:
                    context = torch.relu(self.back[j](z))
                    if x.dim() == 3:
                        context = context.unsqueeze(1).expand(-1, x.shape[1], -1)
                h = self.encoders[j](torch.cat([context, x] if self.reverse else [x, context], -1))
                hs.append(h.mean(1) if h.dim() == 3 else h)
            z = torch.relu(self.head(torch.cat(hs, -1)))
        return z


def _inputs(B=4, T=5, dims=(6, 5, 4)):
    """A sequence, a vector and a sequence: fresh random values each call."""
    return ([torch.randn(B, T, dims[0]), torch.randn(B, dims[1]), torch.randn(B, T - 2, dims[2])],)


@pytest.fixture
def projections(monkeypatch):
    """Every x projection the converted graphs compute, as (x, weight) (patched before the capture)."""
    seen = []
    original = FusedCalls.x_projection

    def counted(self, x, weight, bias, start, stop):
        seen.append((x, weight))
        return original(self, x, weight, bias, start, stop)

    monkeypatch.setattr(FusedCalls, "x_projection", counted)
    return seen


def _convert_and_check(model, expected, backend, projections, projections_per_forward):
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=backend, example_inputs=_inputs())
    assert report.counts == expected, str(report)
    for _ in range(2):  # fresh inputs: the captured graph serves them all
        args = _inputs()
        projections.clear()
        with count_fused_calls() as calls:
            assert_same_model(reference, model, args)
        assert dict(calls) == ops_calls(expected), str(report)
        assert len(projections) == projections_per_forward, str(report)
    return report


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_projection_is_computed_once_per_modality(backend, projections):
    model = PlainProgressive()
    report = _convert_and_check(model, {"x_projection": 3, "context_linear": 6, "fusion_head": 3},
                                backend, projections, projections_per_forward=3)
    # one per modality: the modality's input and its first Linear's weight
    firsts = [enc[0].weight for enc in model.encoders]
    assert sorted(id(w) for _, w in projections) == sorted(id(w) for w in firsts)
    assert sum("x's projection computed once for 3 sites" in line for line in report.replaced) == 9, str(report)
    assert any("W[:, 0:6], b" in line for line in report.replaced), str(report)


def test_a_first_step_back_projecting_zeros_shares_x_projection(projections):
    # z_0 = zeros and every step back-projects z: the vector modality's first step (nothing broadcast,
    # z not a fusion head's output) was read as a fusion head with x's projection of its own.
    model = PlainProgressive(zeros="z0")
    report = _convert_and_check(model, {"context_linear": 9, "fusion_head": 3}, BACKENDS[-1], projections,
                                projections_per_forward=3)
    assert sum("x's projection computed once for 3 sites" in line for line in report.replaced) == 9, str(report)


@pytest.mark.parametrize("zeros", ["repeat", "expand"])
def test_a_zero_context_reshaped_or_repeated_is_still_zeros(zeros, projections):
    # zeros_like(x[..., :1]).repeat(1, 1, C): step 1 was read as a fusion head over positions, with
    # x's projection of its own (not shared with the later steps) and nothing in the report
    model = PlainProgressive(zeros=zeros)
    _convert_and_check(model, {"x_projection": 3, "context_linear": 6, "fusion_head": 3},
                       BACKENDS[-1], projections, projections_per_forward=3)


def test_two_steps_two_modalities_vector_shared_by_its_zero_step():
    model = PlainProgressive(dims=(6, 5), contexts=(3, 2), steps=2)
    reference = copy.deepcopy(model)
    args = ([torch.randn(3, 4, 6), torch.randn(3, 5)],)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=args)
    assert report.counts == {"x_projection": 2, "context_linear": 2, "fusion_head": 2}, str(report)
    assert_same_model(reference, model, ([torch.randn(3, 4, 6), torch.randn(3, 5)],))


def test_an_x_that_differs_per_step_is_not_shared(projections):
    """Each step reads x * step: the sequences are still hoisted (their context is broadcast), one
    projection per step each; the vector's steps share nothing and keep the plain readings."""
    model = PlainProgressive(vary_x=True)
    report = _convert_and_check(model, {"x_projection": 2, "context_linear": 4, "fusion_head": 6},
                                BACKENDS[-1], projections, projections_per_forward=6)
    assert not any("computed once" in line for line in report.replaced), str(report)
    hoisted = [line for line in report.replaced if "x_projection" in line or "context_linear" in line]
    assert hoisted and all("computed for this site alone" in line for line in hoisted), str(report)


def test_an_x_sliced_and_cast_in_every_step_is_shared(projections):
    # Each step's x[..., 0:D].float() is a node of its own: every step projected x again.
    report = _convert_and_check(PlainProgressive(retake=True), {"x_projection": 3, "context_linear": 6, "fusion_head": 3},
                                BACKENDS[-1], projections, projections_per_forward=3)
    assert sum("x's projection computed once for 3 sites" in line for line in report.replaced) == 9, str(report)


def test_a_write_into_the_input_between_steps_ends_the_sharing():
    model = PlainProgressive(retake=True, write_between=True)
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=_inputs())
    assert not any("computed once for 3 sites" in line for line in report.replaced), str(report)
    assert_same_model(reference, model, _inputs())


class RetakenAcrossAWrite(nn.Module):
    """Each step takes x again by the same calls, but what they read is written between the steps:
    the source of a copy (a cast of float64 to float32), an index tensor, the copy itself, or the
    source by a foreach op."""

    def __init__(self, variant, steps=3):
        super().__init__()
        self.variant, self.steps = variant, steps
        self.encoder = nn.Sequential(nn.Linear(6 + 3, 8), nn.ReLU(), nn.Linear(8, 7))
        self.head, self.back = nn.Linear(7, 5), nn.Linear(5, 3)

    def forward(self, inputs):
        source, index, z = inputs * 1.0, torch.arange(6), None
        for step in range(self.steps):
            x = source[..., :6].float() if self.variant in ("copy", "own", "foreach") else source[..., index]
            if step == 0 and self.variant == "foreach":  # a write the graph holds as a list of tensors
                torch._foreach_add_([source], 1.0)
            elif step == 0 and self.variant != "own":  # after x is taken, before the encoder reads it
                source.add_(1.0) if self.variant == "copy" else index.copy_(index.flip(0))
            if step == 1 and self.variant == "own":
                x.mul_(50.0)
            context = x.new_zeros(*x.shape[:-1], 3) if z is None else \
                torch.relu(self.back(z)).unsqueeze(1).expand(-1, x.shape[1], -1)
            z = torch.relu(self.head(self.encoder(torch.cat([x, context], -1)).mean(1)))
        return z


@pytest.mark.parametrize("variant, dtype", [("copy", torch.float64), ("index", torch.float32), ("own", torch.float64),
                                            ("foreach", torch.float32)])
def test_an_x_retaken_across_a_write_is_not_shared(variant, dtype):
    # Both steps' x were read as one (the same calls of the same nodes): the converted model gave
    # other outputs, step 1 reading step 0's x.
    model = RetakenAcrossAWrite(variant)
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=(torch.randn(4, 5, 6, dtype=dtype),))
    assert not any("computed once for 3 sites" in line for line in report.replaced), str(report)
    assert_same_model(reference, model, (torch.randn(4, 5, 6, dtype=dtype),))


def test_context_first_slices_the_weight_the_other_way(projections):
    model = PlainProgressive(reverse=True)
    report = _convert_and_check(model, {"x_projection": 3, "context_linear": 6, "fusion_head": 3},
                                BACKENDS[-1], projections, projections_per_forward=3)
    assert any("W[:, 3:9], b" in line for line in report.replaced), str(report)  # x = columns Dc..Dc+Dx


@pytest.mark.parametrize("activation, fused", [(nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.Tanh, "tanh"),
                                               (nn.Identity, None), (Reused, None)])
@pytest.mark.parametrize("bias", [True, False])
def test_activation_fused_or_not_and_no_bias(activation, fused, bias, projections):
    model = PlainProgressive(dims=(6, 5), contexts=(3, 2), steps=3, activation=activation, bias=bias)
    reference = copy.deepcopy(model)
    args = ([torch.randn(3, 4, 6), torch.randn(3, 5)],)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=args)
    assert report.counts == {"x_projection": 2, "context_linear": 4, "fusion_head": 3}, str(report)
    hoists = [line for line in report.replaced if line.startswith(("context_linear", "x_projection"))]
    assert all(line.split(": ", 1)[1].startswith(f"{fused}(linear(" if fused else "linear(") for line in hoists), \
        str(report)
    assert all(("no bias" in line) != bias for line in hoists), str(report)
    with count_fused_calls() as calls:
        assert_same_model(reference, model, ([torch.randn(3, 4, 6), torch.randn(3, 5)],))
    assert dict(calls) == {"context_linear": 4, "fusion_head": 3}


class ConcatKept(PlainProgressive):
    """The sequence's cat is also kept as an attribute (the last step's, as the forward ends): that
    one is written anyway, nothing to hoist there; step 1's is x's projection."""

    def forward(self, xs):
        x, z = xs[0], None
        for _ in range(self.steps):
            context = x.new_zeros(*x.shape[:-1], self.contexts[0]) if z is None else \
                torch.relu(self.back[0](z)).unsqueeze(1).expand(-1, x.shape[1], -1)
            cat = torch.cat([x, context], -1)
            self.kept = cat
            z = torch.relu(self.head(self.encoders[0](cat).mean(1)))
        return z


def test_a_concat_read_elsewhere_is_not_hoisted_and_the_report_says_why():
    model = ConcatKept(dims=(6,), contexts=(3,), steps=2)
    reference = copy.deepcopy(model)
    args = ([torch.randn(3, 4, 6)],)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=args)
    assert report.counts == {"x_projection": 1, "backproj_concat": 1}, str(report)
    assert any("not swapped: x's projection is not hoisted: the concat is read elsewhere too, so it would "
               "be written anyway" in line for line in report.left_alone), str(report)
    assert_same_model(reference, model, ([torch.randn(3, 4, 6)],))


class ConcatMasked(PlainProgressive):
    """The sequence's cat has its padded positions zeroed in place before the encoder reads it."""

    def forward(self, xs, mask):
        x, z = xs[0], None
        for _ in range(self.steps):
            context = x.new_zeros(*x.shape[:-1], self.contexts[0]) if z is None else \
                torch.relu(self.back[0](z)).unsqueeze(1).expand(-1, x.shape[1], -1)
            cat = torch.cat([x, context], -1)
            cat.masked_fill_(~mask[..., None], 0.0)
            z = torch.relu(self.head(self.encoders[0](cat).mean(1)))
        return z


def test_a_concat_written_in_place_is_not_hoisted_and_the_report_says_so():
    # The report said "the concat is read elsewhere too".
    model = ConcatMasked(dims=(6,), contexts=(3,), steps=2)
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKENDS[-1],
                           example_inputs=([torch.randn(3, 4, 6)], torch.rand(3, 4) > 0.3))
    lines = [line for line in report.left_alone if "x's projection is not hoisted" in line]
    assert lines and all("the concat is written in place at ConcatMasked.forward (test_convert_hoist.py:" in line
                         for line in lines), str(report)
    assert_same_model(reference, model, ([torch.randn(3, 4, 6)], torch.rand(3, 4) > 0.3))


def test_autocast_bf16_keeps_working():
    """Under CPU autocast the Linears return bf16 from fp32 operands: that capture is left alone
    (and says why) and still right; the fp32 capture stays hoisted."""
    model = PlainProgressive()
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=_inputs())
    assert report.counts["context_linear"] == 6, str(report)
    args = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = model(*args), reference(*args)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # the same bf16 ops, unchanged
    assert any("x's projection is not hoisted: the linear returns torch.bfloat16 from torch.float32 operands "
               "(autocast)" in line for line in report.left_alone), str(report)
    assert len(report.captures) == 2, str(report)
    with count_fused_calls() as calls:
        assert_same_model(reference, model, _inputs())
    assert calls["context_linear"] == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_half_and_double_models(backend, dtype):
    model = PlainProgressive().to(dtype)
    reference = copy.deepcopy(model)
    args = torch.utils._pytree.tree_map(lambda t: t.to(dtype), _inputs())
    _, report = pk.convert(model, backend=backend, example_inputs=args)
    assert report.counts == {"x_projection": 3, "context_linear": 6, "fusion_head": 3}, str(report)
    tol = 1e-9 if dtype == torch.float64 else 3e-2
    assert_same_model(reference, model, torch.utils._pytree.tree_map(lambda t: t.to(dtype), _inputs()),
                      rtol=tol, atol=tol)


def test_batch_size_zero():
    model = PlainProgressive()
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=_inputs(B=0))
    assert report.counts == {"x_projection": 3, "context_linear": 6, "fusion_head": 3}, str(report)
    out = model(*_inputs(B=0))
    assert out.shape == reference(*_inputs(B=0)).shape == (0, 5)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_non_contiguous_inputs():
    def inputs():
        seq = torch.randn(4, 6, 5).transpose(1, 2)  # (B, T, D) with stride 1 along T
        return ([seq, torch.randn(5, 4)[:, ::1].t(), torch.randn(4, 3, 8)[..., ::2]],)
    model = PlainProgressive()
    reference = copy.deepcopy(model)
    args = inputs()
    assert not any(x.is_contiguous() for x in args[0])
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=args)
    assert report.counts == {"x_projection": 3, "context_linear": 6, "fusion_head": 3}, str(report)
    assert_same_model(reference, model, inputs())


class WrittenZeros(PlainProgressive):
    """Step 1's context starts as zeros and is then written in place: no zero context any more."""

    def forward(self, xs):
        x = xs[0]
        context = x.new_zeros(*x.shape[:-1], self.contexts[0])
        context[..., 0] = 1.0
        z = torch.relu(self.head(self.encoders[0](torch.cat([x, context], -1)).mean(1)))
        context = torch.relu(self.back[0](z)).unsqueeze(1).expand(-1, x.shape[1], -1)
        return torch.relu(self.head(self.encoders[0](torch.cat([x, context], -1)).mean(1)))


def test_zeros_written_in_place_are_no_zero_context():
    model = WrittenZeros(dims=(6,), contexts=(3,), steps=2)
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKENDS[-1], example_inputs=([torch.randn(3, 4, 6)],))
    assert "x_projection" not in report.counts and report.counts["context_linear"] == 1, str(report)
    assert_same_model(reference, model, ([torch.randn(3, 4, 6)],))
