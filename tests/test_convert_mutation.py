"""convert() on models that write tensors in place or switch grad mode inside their forward: a fused
call computes a pattern's value at one point from the pattern's inputs, so it must not swap a
pattern whose values are changed in place on the way, nor share x's projection across a write into
x or a `no_grad` boundary. Each model here was computed wrongly before (found by a review); now the
converted model equals the original (outputs, every gradient) and the report says what was left."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pf_kernels as pk
from tests.convert_cases import fresh_dynamo  # noqa: F401  (a fixture)
from tests.convert_cases import assert_same_model, cpu_backends

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
BACKEND = "cpu" if "cpu" in cpu_backends() else "torch"


class Progressive(nn.Module):
    """Two sequence modalities, R steps, written by hand; `variant` adds one idiom to it."""

    def __init__(self, variant, dims=(6, 5), context=3, hidden=8, fused=5, steps=3):
        super().__init__()
        self.variant, self.context, self.steps = variant, context, steps
        self.inp = nn.ModuleList(nn.Linear(d + context, hidden) for d in dims)
        self.out = nn.ModuleList(nn.Linear(hidden, hidden) for _ in dims)
        self.pos = nn.Parameter(torch.randn(hidden))
        self.head = nn.Linear(hidden * len(dims), fused)
        self.back = nn.ModuleList(nn.Linear(fused, context) for _ in dims)

    def encode(self, j, x, c):
        h = self.inp[j](torch.cat([x, c], -1))
        if self.variant == "inplace activation":
            h = F.leaky_relu(h, 0.1, inplace=True)
        elif self.variant == "half written through tensor_split":
            h.tensor_split(2, -1)[0].mul_(0.5)
            h = torch.tanh(h)
        elif self.variant == "half written through torch.unflatten":
            torch.unflatten(h, -1, (2, -1))[..., 0, :].mul_(0.5)
            h = torch.tanh(h)
        elif self.variant == "written through ravel":
            h.ravel()[:7].mul_(0.5)
            h = torch.tanh(h)
        elif self.variant == "written through .data":
            h.data.mul_(0.5)
            h = torch.tanh(h)
        elif self.variant == "position added in place":
            h += self.pos
            h = torch.relu(h)
        else:
            h = torch.relu(h)
        return self.out[j](h).mean(1)

    def context_of(self, j, z, x):
        c = self.back[j](z)
        if self.variant == "context scaled in place":
            c.mul_(0.5)
        elif self.variant == "context entry set":
            c[:, 0] = 0
        elif self.variant == "context split and scaled":
            c.tensor_split(2, -1)[0].mul_(0.5)
        return torch.relu(c).unsqueeze(1).expand(-1, x.shape[1], -1)

    def step(self, xs, z):
        hs = []
        for j, x in enumerate(xs):
            c = x.new_zeros(*x.shape[:-1], self.context) if z is None else self.context_of(j, z, x)
            hs.append(self.encode(j, x, c))
        u = torch.cat(hs, -1)
        if self.variant == "fusion input masked":
            u[:, :4] = 0
        return torch.relu(self.head(u))

    def forward(self, xs):
        z = None
        if self.variant == "steps under no_grad":  # only the last step trained
            with torch.no_grad():
                for _ in range(self.steps - 1):
                    z = self.step(xs, z)
            return self.step(xs, z)
        for _ in range(self.steps):
            if self.variant == "context under no_grad" and z is not None:
                with torch.no_grad():
                    z = z * 1.0  # a detached copy of z, then the context from it
                    cs = [self.context_of(j, z, x) for j, x in enumerate(xs)]
                z = torch.relu(self.head(torch.cat([self.encode(j, x, c) for j, (x, c) in
                                                    enumerate(zip(xs, cs))], -1)))
                continue
            z = self.step(xs, z)
            if self.variant == "x scaled in place between steps":
                for x in xs:
                    x.mul_(0.5)
        return z


def inputs(B=4):
    return ([torch.randn(B, 7, 6), torch.randn(B, 5, 5)],)


def converted_pair(variant, **kwargs):
    torch.manual_seed(0)
    return convert_copy(Progressive(variant, **kwargs), inputs())


def convert_copy(model, args):
    """(an unconverted copy of model, model converted in place, the conversion's report)."""
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKEND, example_inputs=args)
    return reference, model, report


@pytest.mark.parametrize("variant", ["inplace activation", "position added in place", "half written through tensor_split",
                                     "half written through torch.unflatten", "written through ravel",
                                     "written through .data"])
def test_a_write_into_the_first_steps_projection_leaves_the_shared_one_alone(variant):
    reference, model, report = converted_pair(variant)
    # x's projection is still computed once per modality and shared by the steps after the first
    assert report.counts.get("x_projection") == 2 and report.counts.get("context_linear") == 4, report
    assert_same_model(reference, model, inputs())


@pytest.mark.parametrize("variant", ["context scaled in place", "context entry set", "context split and scaled"])
def test_a_context_written_in_place_is_not_recomputed_by_a_fused_call(variant):
    reference, model, report = converted_pair(variant)
    # (the encoder's Linear over [x, context] may still be read as a fusion head over positions,
    # which reads the context as it is at the cat)
    assert "context_linear" not in report.counts and "backproj_concat" not in report.counts, report
    assert_same_model(reference, model, inputs())


def test_a_fusion_input_written_in_place_is_not_read_past():
    reference, model, report = converted_pair("fusion input masked")
    heads = [line for line in report.replaced if "linear at head" in line]
    assert not heads and "a value it computes is written in place at" in str(report), report
    assert_same_model(reference, model, inputs())


def test_x_written_in_place_between_steps_is_not_projected_before_the_writes():
    # Each step's projection of x would be kept for the backward, past the write after that step.
    reference, model, report = converted_pair("x scaled in place between steps")
    assert report.counts.get("x_projection", 0) + report.counts.get("context_linear", 0) == 0, report
    assert "after it (the fused op keeps that input for its backward)" in str(report), report
    with torch.no_grad():  # (autograd of the original itself refuses the writes into x)
        args = inputs()
        torch.testing.assert_close(model(*copy.deepcopy(args)), reference(*copy.deepcopy(args)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["steps under no_grad", "context under no_grad"])
def test_no_grad_regions_keep_their_gradients(variant):
    reference, model, report = converted_pair(variant)
    assert report.counts, report  # still converted where the regions allow
    assert_same_model(reference, model, inputs())


class ConcatenateAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 4), nn.Linear(5, 4), nn.Linear(8, 3)

    def forward(self, x, y):
        return torch.relu(self.head(torch.concatenate([self.a(x), self.b(y)], axis=-1)))


def test_concatenate_with_axis_is_read_as_a_feature_cat():
    torch.manual_seed(0)
    args = (torch.randn(4, 6), torch.randn(4, 5))
    reference, model, report = convert_copy(ConcatenateAxis(), args)
    assert report.counts == {"fusion_head": 1}, report
    assert_same_model(reference, model, args)


class ContextReadAgain(nn.Module):
    """Activates the back-projection's output in place and returns it too (an auxiliary output)."""

    def __init__(self):
        super().__init__()
        self.head, self.back = nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, seq, h1, h2):
        z = torch.relu(self.head(torch.cat([h1, h2], -1)))
        c = self.back(z)
        ctx = F.relu(c, inplace=True)  # c now holds relu(back(z)) as well
        x = torch.cat([seq, ctx.unsqueeze(1).expand(-1, seq.shape[1], -1)], -1)
        return torch.cat([x.flatten(1), c], -1)


def test_an_inplace_activation_of_a_value_read_elsewhere_is_not_swapped():
    torch.manual_seed(0)
    args = (torch.randn(3, 4, 3), torch.randn(3, 4), torch.randn(3, 4))
    reference, model, report = convert_copy(ContextReadAgain(), args)
    assert "backproj_concat" not in report.counts and "writes in place into a value" in str(report), report
    assert_same_model(reference, model, args)


class WarmStart(nn.Module):
    """A first step under inference_mode (or a tensor hook on the first step's Linear output)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.enc, self.head, self.back = nn.Linear(4 + 3, 6), nn.Linear(6 + 4, 5), nn.Linear(5, 3)

    def step(self, seq, vec, z, first):
        c = seq.new_zeros(*seq.shape[:2], 3) if z is None else \
            torch.relu(self.back(z)).unsqueeze(1).expand(-1, seq.shape[1], -1)
        h = self.enc(torch.cat([seq, c], -1))
        if first and self.variant == "hook on the first step":
            h.register_hook(lambda g: g * 0.5)  # only the first step's gradient is halved
        return torch.relu(self.head(torch.cat([torch.relu(h).mean(1), vec], -1)))

    def forward(self, seq, vec):
        if self.variant == "first step under inference_mode":
            with torch.inference_mode():
                z = self.step(seq, vec, None, True)
            z = z.clone()
        else:
            z = self.step(seq, vec, None, True)
        for _ in range(2):
            z = self.step(seq, vec, z, False)
        return z


@pytest.mark.parametrize("variant", ["first step under inference_mode", "hook on the first step"])
def test_a_first_step_apart_from_the_others_keeps_its_gradients(variant):
    torch.manual_seed(0)
    args = (torch.randn(3, 5, 4), torch.randn(3, 4))
    reference, model, report = convert_copy(WarmStart(variant), args)
    assert report.counts.get("context_linear") == 2, report  # (the steps after the first still share p)
    assert_same_model(reference, model, args)


class ChannelsFirst(nn.Module):
    """A back-projection concatenated on dim 1 of a (B, C, *S) tensor, then flattened with .view."""

    def __init__(self, positions):
        super().__init__()
        self.head, self.back = nn.Linear(8, 4), nn.Linear(4, 2)
        self.fc = nn.Linear((3 + 2) * positions, 3)

    def forward(self, x, h1, h2):
        z = torch.relu(self.head(torch.cat([h1, h2], -1)))
        c = torch.relu(self.back(z))
        c = c.view(*c.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        out = torch.cat([x, c], dim=1)
        return self.fc(out.reshape(out.shape[0], -1)), out


@pytest.mark.parametrize("layout", ["(B, C, T)", "(B, C, H, W)", "(B, C, H, W) channels-last"])
def test_a_channels_first_concat_keeps_torch_cats_layout(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5) if layout == "(B, C, T)" else torch.randn(2, 3, 2, 3)
    if "channels-last" in layout:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, torch.randn(2, 4), torch.randn(2, 4))
    reference, model, report = convert_copy(ChannelsFirst(x[0, 0].numel()), args)
    assert report.counts.get("backproj_concat") == 1, report
    (y_ref, cat_ref), (y, cat) = reference(*args), model(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cat, cat_ref, rtol=1e-5, atol=1e-6)
    assert cat.stride() == cat_ref.stride()  # (.view works where it does on torch.cat's)


class TwoEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 5)

    def forward(self, x1, x2):
        return torch.relu(self.head(torch.cat([torch.relu(self.enc1(x1)), torch.relu(self.enc2(x2))], -1)))


def test_hooks_added_after_convert_run():
    torch.manual_seed(0)
    args = (torch.randn(2, 4), torch.randn(2, 4))
    reference, model, report = convert_copy(TwoEncoders(), args)
    assert report.counts == {"fusion_head": 1}, report
    seen = {"reference": 0, "converted": 0}
    for name, m in (("reference", reference), ("converted", model)):
        m.enc1.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, seen[name] + 1))
        m.enc2.register_forward_hook(lambda mod, i, o: o * 0.5)  # changes the output
    assert_same_model(reference, model, args)
    assert seen["converted"] == seen["reference"] == 1


class ReturnsItsFeatures(nn.Module):
    """Returns the zero-context features of its encoder as well as the first step's encoder output:
    two sites that share one projection of x, both handed to the caller."""

    def __init__(self, d=6, context=2, hidden=8, fused=7):
        super().__init__()
        self.context = context
        self.enc = nn.Linear(d + context, hidden)
        self.head = nn.Linear(2 * hidden, fused)
        self.back = nn.Linear(fused, context)

    def forward(self, x):
        zeros = x.new_zeros(*x.shape[:-1], self.context)
        features = self.enc(torch.cat([x, zeros], -1))
        c, first = zeros, None
        for _ in range(2):
            h = self.enc(torch.cat([x, c], -1))
            first = h if first is None else first
            z = F.relu(self.head(torch.cat([h.mean(1), h.amax(1)], -1)))
            c = F.relu(self.back(z)).unsqueeze(1).expand(-1, x.shape[1], -1)
        return z, features, first


def test_outputs_that_share_a_projection_are_distinct_tensors_for_the_caller():
    # Both returned tensors were views of one shared projection: zeroing one in place zeroed the
    # other, and autograd refused a backward through a returned tensor written in place.
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6)
    reference, model, report = convert_copy(ReturnsItsFeatures(), (x,))
    assert report.counts.get("x_projection") == 2, report  # two sites, one projection computed
    for m in (reference, model):
        with torch.no_grad():
            _, features, first = m(x)
            features.zero_()
            assert first.abs().sum() > 0
        z, features, _ = m(x)
        features.mul_(0.5)
        (z.sum() + features.sum()).backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


class WritesItsInputsAfterwards(nn.Module):
    """Writes in place, after the patterns read them, into x (after its projection) and into a
    fusion-head input: the original's Linears saved copies (the concats); a fused op that kept
    x or h itself for its backward would fail there."""

    def __init__(self, d=6, context=2, hidden=8, fused=7):
        super().__init__()
        self.context = context
        self.enc = nn.Linear(d + context, hidden)
        self.vec = nn.Linear(d, hidden)
        self.head = nn.Linear(2 * hidden, fused)
        self.back = nn.Linear(fused, context)

    def forward(self, x, v):
        x = x * 1.0
        c = x.new_zeros(*x.shape[:-1], self.context)
        for _ in range(2):
            h = F.relu(self.enc(torch.cat([x, c], -1))).mean(1)
            u = self.vec(v)
            z = F.relu(self.head(torch.cat([h, u], -1)))
            c = F.relu(self.back(z)).unsqueeze(1).expand(-1, x.shape[1], -1)
        x.mul_(2.0)
        u.mul_(0.5)
        return z + u.sum(-1, keepdim=True)


def test_inputs_written_in_place_after_a_pattern_are_not_kept_by_a_fused_op():
    # The converted model raised "modified by an inplace operation" in backward.
    torch.manual_seed(0)
    args = (torch.randn(4, 5, 6), torch.randn(4, 6))
    reference, model, report = convert_copy(WritesItsInputsAfterwards(), args)
    assert "after it (the fused op keeps that input for its backward)" in str(report), report
    assert_same_model(reference, model, args)
