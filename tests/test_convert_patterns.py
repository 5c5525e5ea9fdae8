"""convert()'s patterns, one way of writing them at a time: the ways a back-projection's context is
broadcast and the dims that name the features, the forms of a fusion head, and the near-misses the
report must explain (whole reasons). Outputs and gradients equal the unconverted model's."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pf_kernels as pk
from pf_kernels.convert import count_fused_calls
from tests.convert_cases import fresh_dynamo  # noqa: F401  (a fixture)
from tests.convert_cases import assert_same_model, cpu_backends

BACKEND = "cpu" if "cpu" in cpu_backends() else "torch"
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _convert_and_check(model, args, expected, backend=BACKEND):
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=backend, example_inputs=args)
    assert report.counts == expected, str(report)
    with count_fused_calls() as calls:
        assert_same_model(reference, model, args)
    assert dict(calls) == expected, str(report)
    return report


def _flat(outputs):
    return torch.cat([o.flatten(1) for o in outputs], dim=1)


class BroadcastForms(nn.Module):
    """A fusion head, then one back-projection of its output per way of writing the broadcast, and
    one context shared by two modalities."""

    def __init__(self, d=3):
        super().__init__()
        self.head = nn.Linear(4 + 5, 6)
        self.back = nn.ModuleList(nn.Linear(6, d) for _ in range(8))
        self.shared = nn.Linear(6, 2)
        self.weight = nn.Parameter(torch.randn(d, 6) * 0.4)  # a functional back-projection
        self.bias = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, seq, img, img_cf, vec, h1, h2):
        z = torch.relu(self.head(torch.cat([h1, h2], -1)))
        B, T = seq.shape[:2]
        c = [torch.relu(self.back[0](z)), torch.sigmoid(self.back[1](z)), torch.tanh(self.back[2](z)),
             F.gelu(self.back[3](z)), self.back[4](z), self.back[5](z).relu(), F.relu(self.back[6](z)),
             torch.sigmoid(self.back[7](z)), torch.tanh(F.linear(z, self.weight, self.bias))]
        shared = torch.tanh(self.shared(z))
        return _flat([
            torch.cat([seq, c[0].unsqueeze(1).expand(-1, T, -1)], dim=-1),
            torch.cat([seq, c[1][:, None, :].expand(B, T, 3)], dim=2),
            torch.cat([seq, c[2].unsqueeze(-2).repeat(1, T, 1)], 2),
            torch.cat([seq, c[3].view(B, 1, -1).expand_as(seq[..., :3])], -1),
            torch.cat([img, torch.broadcast_to(c[4][:, None, None], img.shape[:-1] + (3,))], 3),
            torch.cat([img_cf, c[5][..., None, None].expand(-1, -1, *img_cf.shape[2:])], dim=1),
            torch.cat([img, c[6].reshape(B, 1, 1, 3).expand(-1, img.shape[1], img.shape[2], -1)], -1),
            torch.cat([vec, c[7]], dim=1),
            torch.cat([seq, torch.unsqueeze(c[8], 1).expand(-1, T, -1).contiguous()], -1),
            torch.cat([seq, shared.unsqueeze(1).expand(-1, T, -1)], -1),
            torch.cat([vec, shared], -1),
        ])


@pytest.mark.parametrize("B", [4, 1])
def test_every_way_of_broadcasting_the_context_and_naming_the_feature_dim(B):
    """B=1 too (online serving): a capture at batch size 1 holds view/reshape to (1, 1, Dc), whose
    batch dim is itself a singleton (it was read as ambiguous and left alone)."""
    T = 5
    args = (torch.randn(B, T, 4), torch.randn(B, 3, 2, 4), torch.randn(B, 4, 3, 2), torch.randn(B, 7),
            torch.randn(B, 4), torch.randn(B, 5))
    report = _convert_and_check(BroadcastForms(), args, {"fusion_head": 1, "backproj_concat": 11})
    assert not report.left_alone, str(report)


class HeadForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.e = nn.Linear(7, 4), nn.Linear(7, 4), nn.Linear(7, 4, bias=False)
        self.c = nn.Sequential(nn.Linear(7, 4), nn.GELU(), nn.Linear(4, 2))
        self.w = nn.Parameter(torch.randn(3, 5) * 0.4)
        self.bias = nn.Parameter(torch.randn(3) * 0.1)
        self.f = nn.Linear(3 + 4 + 3, 2)
        self.kept = None

    def forward(self, h1, h2, s1, s2):
        y1 = torch.sigmoid(self.a(torch.cat([h1, h2], dim=1)))       # dim=1 on 2-D
        pre = self.b(torch.cat((h1, h2), -1))
        y2 = pre.relu() + pre                                        # the linear's output is read twice
        y3 = self.c(torch.cat([h1, h2], -1))                         # an nn.Sequential head with GELU
        y4 = F.linear(torch.cat([s1, s2], dim=2), self.w, self.bias).tanh()  # early fusion over positions
        cat = torch.cat([h1, h2], 1)
        self.kept = cat                                              # the concat is kept as well
        y5 = self.e(cat)
        y6 = self.f(torch.cat([h1, h2, h1], -1))                     # three inputs, one of them twice
        return _flat([y1, y2, y3, y4, y5, y6])


def test_fusion_head_forms():
    B = 5
    args = (torch.randn(B, 3), torch.randn(B, 4), torch.randn(B, 6, 2), torch.randn(B, 6, 3))
    model = HeadForms()
    report = _convert_and_check(model, args, {"fusion_head": 6})
    assert not report.left_alone, str(report)
    assert model.kept.shape == (B, 7)
    assert sum("over positions" in line for line in report.replaced) == 1


class NearMisses(nn.Module):
    """Cats and linears that look like the patterns but must not be swapped."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4 + 5, 6)
        self.back = nn.ModuleList(nn.Linear(6, 2) for _ in range(8))
        self.other = nn.Linear(3, 2)
        self.positions = nn.Linear(2, 3)

    def forward(self, seq, vec, u, h1, h2, seq2):
        z = torch.relu(self.head(torch.cat([h1, h2], -1)))
        T = seq.shape[1]

        def spread(c):
            return c.unsqueeze(1).expand(-1, T, -1)

        return _flat([
            torch.cat([spread(torch.relu(self.back[0](z))), seq], -1),
            torch.cat([seq, spread(F.leaky_relu(self.back[1](z)))], -1),
            torch.cat([seq, spread(F.gelu(self.back[2](z), approximate="tanh"))], -1),
            torch.cat([vec, torch.tanh(self.other(u))], -1),
            torch.cat([seq, spread(torch.relu(self.back[3](z))), seq], -1),
            torch.cat([seq, spread(torch.relu(self.back[4](z)))], dim=1),
            torch.cat([seq, torch.relu(self.back[5](spread(z)))], -1),
            torch.cat([seq.double(), spread(torch.relu(self.back[6](z))).to(torch.float64)], -1).float(),
            torch.cat([seq, spread(torch.relu(self.back[7](z))).reshape(seq.shape[0], T, 2)], -1),
            self.positions(torch.cat([seq, seq2], dim=1)),
        ])


NEAR_MISS_REASONS = [
    "the context comes first in the cat: backproj_concat writes [x, context] (x first, one context)",
    "the context is leaky_relu(linear(z)): backproj_concat applies none, relu, gelu, tanh, sigmoid",
    "the context is gelu(approximate='tanh')(linear(z)): backproj_concat applies none, relu, gelu, tanh, "
    "sigmoid",
    "nothing is broadcast and z is not a late-fusion output (linear over a concat, or a pf_kernels fusion "
    "op, or the zeros of a first step): this is an ordinary layer's output joined to x, not a back-projection",
    "a cat of 3 tensors: backproj_concat writes [x, context] (x first, one context)",
    "the context's batch and feature dims end up at 0 and 2, not at 0 and 1",
    "the context linear's output is 3-D: backproj_concat projects one vector z (B, Dz) per example",
    "the context reaches the cat through `to`, which changes its dtype or device",
    "the context reaches the cat through `reshape`, applied to an already expanded context",
    "the cat joins dim 1 of 3-D tensors (positions, not features): fusion_head concatenates features "
    "(the last dim)",
]


def test_near_misses_are_reported_with_their_whole_reason():
    B, T = 3, 4
    args = (torch.randn(B, T, 2), torch.randn(B, 5), torch.randn(B, 3), torch.randn(B, 4),
            torch.randn(B, 5), torch.randn(B, 2, 2))
    report = _convert_and_check(NearMisses(), args, {"fusion_head": 1})
    text = "\n".join(report.left_alone)
    for reason in NEAR_MISS_REASONS:
        assert reason in text, f"missing: {reason}\n{report}"
    assert all(": not swapped: " in line for line in report.left_alone)


def test_autocast_is_left_alone_and_still_right():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    wrapper = _HeadOnly(model)
    args = (torch.randn(3, 5), torch.randn(3, 3))
    reference = copy.deepcopy(wrapper)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, report = pk.convert(wrapper, backend=BACKEND, example_inputs=args)
        torch.testing.assert_close(wrapper(*args), reference(*args))
    assert any("(autocast): the fused ops compute in their operands' dtype" in line
               for line in report.left_alone), str(report)


class _HeadOnly(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, a, b):
        return self.head(torch.cat([a, b], -1))


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(7, 6)
        self.back = nn.Linear(6, 2)

    def forward(self, seq, h1, h2):
        z = torch.tanh(self.head(torch.cat([h1, h2], -1)))
        if z.sum() > 0:  # data-dependent control flow: torch.compile breaks the graph here
            z = -z
        return torch.cat([seq, torch.relu(self.back(z)).unsqueeze(1).expand(-1, seq.shape[1], -1)], -1)


def test_a_graph_break_is_reported_and_each_side_converted():
    args = (torch.randn(3, 4, 2), torch.randn(3, 3), torch.randn(3, 4))
    report = _convert_and_check(WithGraphBreak(), args, {"fusion_head": 1, "backproj_concat": 1})
    assert any("into 2 graphs (graph breaks" in line for line in report.left_alone), str(report)


def test_count_fused_calls_counts_and_restores():
    originals = (pk.ops.fusion_head, pk.ops.backproj_concat, pk.ops.context_linear)
    hs, w = [torch.randn(2, 3), torch.randn(2, 4)], torch.randn(5, 7)
    with count_fused_calls() as calls:
        pk.ops.fusion_head(hs, w)
        pk.ops.fusion_head(hs, w)
        pk.ops.backproj_concat(torch.randn(2, 6, 3), torch.randn(2, 5), torch.randn(4, 5))
    assert dict(calls) == {"fusion_head": 2, "backproj_concat": 1}
    try:
        with count_fused_calls():
            raise KeyError("inside")
    except KeyError:
        pass
    assert (pk.ops.fusion_head, pk.ops.backproj_concat, pk.ops.context_linear) == originals


class BreakInTheLoop(WithGraphBreak):
    def forward(self, seq, h1, h2):
        z = torch.tanh(self.head(torch.cat([h1, h2], -1)))
        for _ in range(2):
            if z.sum() > 0:  # a break inside a loop: dynamo runs the whole forward as it is
                z = -z
        return torch.cat([seq, torch.relu(self.back(z)).unsqueeze(1).expand(-1, seq.shape[1], -1)], -1)


def test_a_graph_break_in_a_loop_is_reported_and_the_model_keeps_its_forward():
    args = (torch.randn(3, 4, 2), torch.randn(3, 3), torch.randn(3, 4))
    model = BreakInTheLoop()
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKEND, example_inputs=args)
    assert "forward" not in model.__dict__ and report.counts == {}
    assert any("captured no graph of BreakInTheLoop.forward" in line for line in report.left_alone), str(report)
    assert "no forward captured yet" not in str(report)
    assert_same_model(reference, model, args)


def test_a_forward_dynamo_gives_up_on_is_reported_with_its_error(monkeypatch):
    """Where dynamo failed on the forward itself (and ran it as plain Python), the report guessed:
    "captured no graph ... a graph break inside a loop", or "nothing to swap" where a submodule's own
    frame had been captured (torch 2.11 on an nn.LSTM model)."""
    from pf_kernels.convert import capture
    from tests.convert_cases import tanh_progressive_inputs, tanh_progressive_model

    def refuse(gm, calls, report):
        raise RuntimeError("the rewrite refused")

    monkeypatch.setattr(capture, "rewrite_graph", refuse)
    model, _ = tanh_progressive_model()
    reference, args = copy.deepcopy(model), tanh_progressive_inputs()
    _, report = pk.convert(model, backend=BACKEND, example_inputs=args)
    assert "forward" not in vars(model) and not report.replaced
    assert report.left_alone == ["torch.compile could not capture TanhProgressive.forward (RuntimeError: the rewrite "
                                 "refused; dynamo's \"WON'T CONVERT\" warning has the trace): the model keeps its own "
                                 "forward"], str(report)
    assert_same_model(reference, model, args)


class StockLSTM(nn.Module):
    """The paper's stock model: an LSTM per stock over [its returns, the context]."""

    def __init__(self, stocks=3, hidden=8, fused=12, context=4, steps=3):
        super().__init__()
        self.context, self.steps = context, steps
        self.encoders = nn.ModuleList([nn.LSTM(1 + context, hidden, batch_first=True) for _ in range(stocks)])
        self.fuse = nn.Linear(stocks * hidden, fused)
        self.back = nn.ModuleList([nn.Sequential(nn.Linear(fused, context), nn.Tanh()) for _ in range(stocks)])

    def forward(self, returns):
        B, T, stocks = returns.shape
        contexts = [returns.new_zeros(B, self.context)] * stocks
        for _ in range(self.steps):
            hs = []
            for j, encoder in enumerate(self.encoders):
                x = torch.cat([returns[:, :, j:j + 1], contexts[j].unsqueeze(1).expand(-1, T, -1)], -1)
                hs.append(encoder(x)[1][0][-1])
            z = self.fuse(torch.cat(hs, -1))
            contexts = [back(z) for back in self.back]
        return z


def test_an_lstm_model_is_converted_or_says_why_not():
    # torch 2.13 captures it; torch 2.11's trace of the LSTM gives its state a wrong shape and dynamo
    # gives up: the report says so rather than "nothing to swap".
    model, args = StockLSTM(), (torch.randn(4, 6, 3),)
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend=BACKEND, example_inputs=args)
    if report.replaced:
        assert report.counts == {"fusion_head": 3, "backproj_concat": 6}, str(report)  # steps 2 and 3 broadcast
    else:
        assert [line for line in report.left_alone if "could not capture StockLSTM.forward" in line
                and "nn.LSTM/GRU/RNN" in line], str(report)
    assert_same_model(reference, model, args)


class BroadcastBias(nn.Module):
    """Biases F.linear broadcasts but the fused ops do not take: (1, out) and 0-d."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(1, 5))
        self.bw, self.bb = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(()))

    def forward(self, seq, h1, h2):
        z = torch.relu(F.linear(torch.cat([h1, h2], -1), self.w, self.b))
        c = torch.relu(F.linear(z, self.bw, self.bb))
        return torch.cat([seq, c.unsqueeze(1).expand(-1, seq.shape[1], -1)], -1)


def test_a_bias_of_another_shape_than_out_is_left_alone():
    _convert_and_check(BroadcastBias(), (torch.randn(3, 4, 2), torch.randn(3, 3), torch.randn(3, 4)), {})


class Steps(nn.Module):
    def __init__(self, dims, hidden=8, fused=6, context=4):
        super().__init__()
        self.context = context
        self.enc = nn.ModuleList(nn.Linear(d + context, hidden) for d in dims)
        self.back = nn.ModuleList(nn.Linear(fused, context) for _ in dims)
        self.head = nn.Linear(len(dims) * hidden, fused)

    def forward(self, xs):
        z = None
        for _ in range(2):
            hs = []
            for j, x in enumerate(xs):
                c = x.new_zeros(*x.shape[:2], self.context) if z is None else \
                    torch.relu(self.back[j](z)).unsqueeze(1).expand(-1, x.shape[1], -1)
                hs.append(torch.relu(self.enc[j](torch.cat([x, c], -1))).mean(1))
            z = torch.tanh(self.head(torch.cat(hs, -1)))
        return z


def test_models_of_one_class_with_other_sizes_are_each_captured_with_static_sizes():
    # dynamo remembers sizes that changed per file, line and code name: without a name of its own,
    # the second model would be captured with symbolic feature widths and nothing hoisted
    for dims in [(6, 7), (10, 3), (6, 7)]:
        xs = [torch.randn(3, 4, d) for d in dims]
        model = Steps(dims)
        reference = copy.deepcopy(model)
        _, report = pk.convert(model, backend=BACKEND, example_inputs=(xs,))
        assert report.counts == {"fusion_head": 2, "context_linear": 2, "x_projection": 2}, str(report)
        assert "static shapes" in report.captures[0], str(report)
        assert_same_model(reference, model, (xs,))


@pytest.mark.parametrize("source,path", [
    ("enc[0]", "enc.0"), ("__dict__['_modules']['enc'].0", "enc.0"), ("_modules['enc'][1].fc", "enc.1.fc"),
    ("blocks['audio'].proj", "blocks.audio.proj"), ("head", "head"),
])
def test_module_paths_are_named_as_the_model_names_them(source, path):
    # dynamo names a submodule by how the forward reached it: after a recapture, or through a
    # comprehension, `__dict__['_modules']['enc'].0`; the report listed one site under two names
    from pf_kernels.convert.patterns import _module_path
    assert _module_path(source) == path
