"""refine_step_hoisted (DESIGN §7): a refinement step of encoders whose first Linears are hoisted,
the fusion head then every modality's context_linear; one launch on the triton backend (run here
through the Triton interpreter), composed from each backend's fusion_head and context_linear on the
others. Forward and backward against the reference, the identity it rests on, the one-launch limits,
bad input, and ProgressiveFusion calling it."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import pf_kernels as pk
from pf_kernels import reference
from pf_kernels.nn import ProgressiveFusion
from tests.cases import ACTIVATIONS, assert_matches_reference, hoisted_step_call as step_call, \
    hoisted_step_inputs as step_inputs

_REPORT = pk.available_backends()
_TRITON = _REPORT["triton"]
TRITON_DEVICE = "cpu" if "cpu" in _TRITON["devices"] else "cuda"
HAS_TRITON = _TRITON["available"] and (TRITON_DEVICE == "cpu" or torch.cuda.is_available())
BACKENDS = {
    "torch": ([], "cpu", [torch.float64, torch.float32, torch.bfloat16]),
    "cpu": ([pytest.mark.skipif(not _REPORT["cpu"]["available"], reason="pf_kernels._C is not built")], "cpu",
            [torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    "cuda": ([pytest.mark.skipif(not (_REPORT["cuda"]["available"] and torch.cuda.is_available()),
                                 reason="needs a GPU and the CUDA build (the composition is the cpu case's)")],
             "cuda", [torch.float32, torch.bfloat16, torch.float16]),
    "triton": ([pytest.mark.skipif(not HAS_TRITON, reason=f"the triton backend cannot run here: {_TRITON['reason']}")],
               TRITON_DEVICE, [torch.float32, torch.bfloat16, torch.float16]),
}


def backend_params(dtypes=True):
    for name, (marks, _, types) in BACKENDS.items():
        for dtype in (types if dtypes else types[:1]):
            yield pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}")


MODALITIES = [((4,), 6), ((), 9), ((3, 2), 5)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_is_the_encoders_first_linear_over_refine_step(activation):
    """The identity: each modality's Linear over refine_step's x~_j equals context_linear on p_j."""
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    hs, hw, hb = [g(3, 4), g(3, 2)], g(5, 6), g(5)
    xs, ws, bs = [g(3, 4, 7), g(3, 2)], [g(2, 5), g(3, 5)], [g(2), None]
    linears = [(g(6, 7 + 2), g(6)), (g(4, 2 + 3), g(4))]
    z, x_tildes = reference.refine_step(hs, hw, hb, xs, ws, bs, "tanh", activation)
    want = [reference.apply_activation(F.linear(x, w, b), a) for x, (w, b), a in zip(x_tildes, linears, ("relu", "gelu"))]
    ps = [F.linear(x, w[:, :x.shape[-1]], b) for x, (w, b) in zip(xs, linears)]
    vs = [w[:, x.shape[-1]:] for x, (w, _) in zip(xs, linears)]
    z2, outs = reference.refine_step_hoisted(hs, hw, hb, ps, ws, bs, vs, "tanh", activation, ["relu", "gelu"])
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    for got, expected in zip(outs, want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,dtype", list(backend_params()))
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_matches_reference(backend, dtype, noncontiguous):
    device = BACKENDS[backend][1]
    args = step_inputs(5, (7, 3), 19, MODALITIES, dtype, device, noncontiguous)
    assert_matches_reference(step_call(backend), step_call("torch"), args)


@pytest.mark.parametrize("backend,dtype", list(backend_params(dtypes=False)))
@pytest.mark.parametrize("head_act", ACTIVATIONS)
def test_every_activation(backend, dtype, head_act):
    device = BACKENDS[backend][1]
    bp_act = ACTIVATIONS[(ACTIVATIONS.index(head_act) + 1) % 5]
    out_acts = [ACTIVATIONS[(ACTIVATIONS.index(head_act) + 2 + j) % 5] for j in range(3)]
    args = step_inputs(3, (4,), 6, MODALITIES, dtype, device, biases=[False, True, False])
    assert_matches_reference(step_call(backend, head_act, bp_act, out_acts),
                             step_call("torch", head_act, bp_act, out_acts), args)


@pytest.mark.parametrize("backend,dtype", list(backend_params(dtypes=False)))
def test_batch_zero_and_one_str_for_every_output_activation(backend, dtype):
    device = BACKENDS[backend][1]
    hs, hw, hb, ps, ws, bs, vs = step_inputs(0, (4, 2), 6, MODALITIES[:2], dtype, device)
    z, outs = pk.refine_step_hoisted(hs, hw, hb, ps, ws, bs, vs, "relu", "relu", "gelu", backend=backend)
    assert z.shape == (0, 6) and [o.shape for o in outs] == [p.shape for p in ps]
    (z.sum() + sum(o.sum() for o in outs)).backward()
    assert hw.grad is not None and not hw.grad.any() and ws[0].grad is not None
    args = step_inputs(4, (4, 2), 6, MODALITIES[:2], dtype, device)
    assert_matches_reference(step_call(backend, "relu", "relu", ("gelu", "gelu")),
                             lambda *a: [t for part in pk.refine_step_hoisted(*a, "relu", "relu", "gelu",
                                                                              backend="torch")
                                         for t in (part if isinstance(part, list) else [part])], args)


@pytest.mark.skipif(not HAS_TRITON, reason=f"the triton backend cannot run here: {_TRITON['reason']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("programs", [3, 512])
def test_triton_row_blocks_and_position_splits(monkeypatch, dtype, programs):
    """B = 37 is three row blocks of the one-launch kernel; PROGRAMS_TARGET = 3 makes one split per
    row block walk every position block of every modality; Dz, Dc and H beyond one block."""
    rsh = importlib.import_module("pf_kernels.triton.refine_step_hoisted")
    monkeypatch.setattr(rsh, "PROGRAMS_TARGET", programs)
    args = step_inputs(37, (9, 20), 40, [((9,), 70), ((3, 5), 33)], dtype, TRITON_DEVICE, True, Dcs=[37, 5])
    assert_matches_reference(step_call("triton"), step_call("torch"), args)


@pytest.mark.skipif(not HAS_TRITON, reason=f"the triton backend cannot run here: {_TRITON['reason']}")
def test_triton_outside_the_one_launch_limits_composes(monkeypatch):
    rsh = importlib.import_module("pf_kernels.triton.refine_step_hoisted")
    launched = []
    original = rsh.refine_step_hoisted_op
    monkeypatch.setattr(rsh, "refine_step_hoisted_op", lambda *a: launched.append(1) or original(*a))
    five = [((2,), 3)] * 5  # more modalities than MAX_MODALITIES
    assert_matches_reference(step_call("triton", out_acts=["tanh"] * 5), step_call("torch", out_acts=["tanh"] * 5),
                             step_inputs(3, (4,), 6, five, device=TRITON_DEVICE))
    max_dz = importlib.import_module("pf_kernels.triton.refine_step").MAX_DZ
    wide = step_inputs(2, (4,), max_dz + 3, MODALITIES[:1], device=TRITON_DEVICE)
    assert_matches_reference(step_call("triton"), step_call("torch"), wide)
    assert not launched
    assert_matches_reference(step_call("triton"), step_call("torch"), step_inputs(2, (4,), 6, MODALITIES,
                                                                                  device=TRITON_DEVICE))
    assert launched


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=BACKENDS["cpu"][0])])
def test_gradcheck_float64(backend):
    hs, hw, hb, ps, ws, bs, vs = step_inputs(2, (3, 2), 4, [((2,), 3), ((), 2)], torch.float64)
    k = len(hs)

    def fn(*flat):
        h, rest = list(flat[:k]), flat[k:]
        z, outs = pk.refine_step_hoisted(h, rest[0], rest[1], list(rest[2:4]), list(rest[4:6]), [rest[6], None],
                                         list(rest[7:9]), "tanh", "sigmoid", ["gelu", "tanh"], backend=backend)
        return (z, *outs)
    assert torch.autograd.gradcheck(fn, (*hs, hw, hb, *ps, *ws, bs[0], *vs))


def test_bad_input_names_the_argument():
    hs, hw, hb, ps, ws, bs, vs = step_inputs(3, (4,), 6, MODALITIES[:2])
    call = lambda **k: pk.refine_step_hoisted(**{**dict(hs=hs, head_weight=hw, head_bias=hb, ps=ps, bp_weights=ws,  # noqa: E731
                                                        bp_biases=bs, proj_weights=vs), **k})
    with pytest.raises(ValueError, match="one p, bp_weight, bp_bias, proj_weight and out_activation per modality"):
        call(proj_weights=vs[:1])
    with pytest.raises(ValueError, match=r"proj_weights\[1\] must be \(H, Dc\) = \(9, 3\)"):
        call(proj_weights=[vs[0], vs[1][:, :2]])
    with pytest.raises(ValueError, match=r"out_activations\[1\] must be one of"):
        call(out_activations=["relu", "swish"])
    with pytest.raises(TypeError, match="out_activations must be a str or a list"):
        call(out_activations=3)
    with pytest.raises(ValueError, match=r"refine_step_hoisted: batch sizes differ: ps\[0\]"):
        call(ps=[ps[0][:2], ps[1]])
    with pytest.raises(TypeError, match=r"ps\[1\] has dtype torch.float64 but hs\[0\] has torch.float32"):
        call(ps=[ps[0], ps[1].double()])
    with pytest.raises(TypeError, match="ps must be a list or tuple"):
        call(ps=ps[0])


class _SequenceEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(5 + 2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.mlp(x).mean(1)


def test_progressive_fusion_with_every_encoder_hoisted_calls_it_once_per_refinement(monkeypatch):
    encoders = [_SequenceEncoder(), torch.nn.Sequential(torch.nn.Linear(3 + 3, 6), torch.nn.Tanh())]
    model = ProgressiveFusion(encoders, [4, 6], 7, [2, 3], iterations=3)
    assert model.hoisted == (0, 1)
    calls = []
    for name in ("refine_step_hoisted", "context_linear", "fusion_head"):
        original = getattr(pk.ops, name)
        monkeypatch.setattr(pk.ops, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    xs = [torch.randn(4, 10, 5), torch.randn(4, 3)]
    z = model(xs)
    assert calls.count("refine_step_hoisted") == 2 and "context_linear" not in calls
    plain = ProgressiveFusion(encoders, [4, 6], 7, [2, 3], iterations=3, hoist=False)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(z, plain(xs), rtol=1e-5, atol=1e-6)
