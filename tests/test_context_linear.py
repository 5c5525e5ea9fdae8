"""context_linear: the reference against hand-written loops and against the unhoisted computation
(the encoder's Linear over backproj_concat's output); the cpu backend against the reference (every
dtype, shape, layout, activation, output activation, bias or not, forward and every gradient);
float64 gradcheck; opcheck; errors; which backend serves it."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

import pf_kernels as pk
from pf_kernels import _dispatch, reference
from tests.cases import (ACTIVATIONS, CONTEXT_SHAPES, assert_matches_reference, context_call,
                         context_inputs)

HAS_C = pk.available_backends()["cpu"]["available"]
needs_c = pytest.mark.skipif(not HAS_C, reason="pf_kernels._C is not built")
BACKEND = "cpu"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

SCALAR_ACT = {
    "none": lambda v: v,
    "relu": lambda v: max(v, 0.0),
    "gelu": lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))),
    "tanh": math.tanh,
    "sigmoid": lambda v: 1.0 / (1.0 + math.exp(-v)),
}


def loop_context_linear(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation):
    B, H, Dc, Dz = p.shape[0], p.shape[-1], bp_weight.shape[0], bp_weight.shape[1]
    out = torch.empty(p.shape, dtype=torch.float64)
    for b in range(B):
        context = [SCALAR_ACT[activation](sum(float(z[b, k]) * float(bp_weight[c, k]) for k in range(Dz))
                                          + (float(bp_bias[c]) if bp_bias is not None else 0.0))
                   for c in range(Dc)]
        term = [sum(context[c] * float(proj_weight[h, c]) for c in range(Dc)) for h in range(H)]
        for pos in itertools.product(*[range(n) for n in p.shape[1:-1]]):
            for h in range(H):
                out[(b, *pos, h)] = SCALAR_ACT[out_activation](float(p[(b, *pos, h)]) + term[h])
    return out


def rotating_combos(index):
    """Five (activation, out_activation, bias) triples; over five consecutive indices every pair
    of activations appears, with and without a bias."""
    return [(ACTIVATIONS[i], ACTIVATIONS[(i + index) % 5], (i + index) % 2 == 0) for i in range(5)]


@pytest.mark.parametrize("shape", CONTEXT_SHAPES[:7], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("out_activation", ["none", "gelu"])
def test_reference_matches_loops(shape, activation, out_activation):
    B, S, H, Dz, Dc = shape
    args = context_inputs(B, S, H, Dz, Dc, ACTIVATIONS.index(activation) % 2 == 0, torch.float64,
                          requires_grad=False)
    out = reference.context_linear(*args, activation, out_activation)
    assert out.shape == (B, *S, H) and out.dtype == torch.float64
    torch.testing.assert_close(out, loop_context_linear(*args, activation, out_activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("out_activation", ACTIVATIONS)
def test_reference_is_the_linear_over_backproj_concat(activation, out_activation):
    """The identity hoisting rests on: W [x, c] + b = (W_x x + b) + W_c c at every position."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    z = torch.randn(3, 6, dtype=torch.float64)
    bp_weight, bp_bias = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    weight, bias = torch.randn(7, 5 + 2, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    unhoisted = reference.apply_activation(
        F.linear(reference.backproj_concat(x, z, bp_weight, bp_bias, activation), weight, bias), out_activation)
    p = F.linear(x, weight[:, :5], bias)
    hoisted = reference.context_linear(p, z, bp_weight, bp_bias, weight[:, 5:], activation, out_activation)
    torch.testing.assert_close(hoisted, unhoisted, rtol=1e-12, atol=1e-12)


@needs_c
@pytest.mark.parametrize("index,shape", list(enumerate(CONTEXT_SHAPES)), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_cpu_matches_reference(index, shape, dtype, noncontiguous):
    B, S, H, Dz, Dc = shape
    for activation, out_activation, bias in rotating_combos(2 * index + noncontiguous):
        args = context_inputs(B, S, H, Dz, Dc, bias, dtype, noncontiguous=noncontiguous)
        assert_matches_reference(context_call(BACKEND, activation, out_activation),
                                 context_call("torch", activation, out_activation), args)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_activation", ACTIVATIONS)
def test_cpu_every_activation_pair(dtype, out_activation):
    for activation in ACTIVATIONS:
        for bias in (True, False):
            args = context_inputs(3, (4, 2), 9, 5, 6, bias, dtype, noncontiguous=bias)
            assert_matches_reference(context_call(BACKEND, activation, out_activation),
                                     context_call("torch", activation, out_activation), args)


@needs_c
@pytest.mark.parametrize("out_activation", ["none", "relu", "gelu", "tanh", "sigmoid"])
def test_cpu_gradcheck_float64(out_activation):
    for activation in ("none", "gelu", "tanh", "sigmoid"):  # relu: kink, below
        args = context_inputs(2, (3, 2), 4, 3, 2, True, torch.float64)
        if out_activation == "relu":  # pre-activations far from 0
            with torch.no_grad():
                args[0].add_(torch.sign(args[0]) * 3)
        assert torch.autograd.gradcheck(context_call(BACKEND, activation, out_activation), args)
    args = context_inputs(3, (2,), 3, 4, 2, False, torch.float64, noncontiguous=True)
    assert torch.autograd.gradcheck(context_call(BACKEND, "tanh", "sigmoid"), args)


@needs_c
def test_cpu_relu_gradcheck_away_from_the_kink():
    p, z, w, b, pw = context_inputs(2, (3,), 4, 3, 2, True, torch.float64)
    with torch.no_grad():
        b.add_(torch.sign(b) * 3)
    assert torch.autograd.gradcheck(context_call(BACKEND, "relu", "none"), (p, z, w, b, pw))


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_p_is_grad_out_without_an_output_activation(dtype):
    p, z, w, b, pw = context_inputs(2, (3,), 4, 5, 6, True, dtype, requires_grad=False)
    p.requires_grad_(True)
    out = pk.context_linear(p, z, w, b, pw, backend=BACKEND)
    g = torch.randn_like(out)
    (gp,) = torch.autograd.grad(out, p, g)
    assert gp.data_ptr() == g.data_ptr()  # no copy
    z.requires_grad_(True)
    out = pk.context_linear(p, z, w, b, pw, backend=BACKEND)
    gp, _ = torch.autograd.grad(out, [p, z], g)
    assert gp.data_ptr() == g.data_ptr()


@needs_c
def test_only_some_inputs_need_grad():
    for needs in ([0], [1], [2], [4], [0, 3]):
        for out_activation in ("none", "tanh", "relu"):
            args = list(context_inputs(2, (3,), 4, 5, 6, True, requires_grad=False))
            for i in needs:
                args[i].requires_grad_(True)
            got = torch.autograd.grad(context_call(BACKEND, "gelu", out_activation)(*args).square().sum(),
                                      [args[i] for i in needs])
            want = torch.autograd.grad(context_call("torch", "gelu", out_activation)(*args).square().sum(),
                                       [args[i] for i in needs])
            for a, e in zip(got, want):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_c
def test_inference_mode_and_no_grad():
    args = context_inputs(2, (3,), 4, 5, 6, True)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            for out_activation in ("none", "sigmoid"):
                torch.testing.assert_close(pk.context_linear(*args, "tanh", out_activation, backend=BACKEND),
                                           reference.context_linear(*args, "tanh", out_activation))


@needs_c
def test_nan_reaches_the_output_as_torch_relu_keeps_it():
    p, z, w, b, pw = context_inputs(2, (3,), 4, 5, 6, True, requires_grad=False)
    p[0, 1, 2] = float("nan")
    out = pk.context_linear(p, z, w, b, pw, "tanh", "relu", backend=BACKEND)
    assert torch.isnan(out[0, 1, 2]) and torch.isfinite(out[1]).all()


def _opcheck_samples():
    yield context_inputs(3, (4,), 5, 6, 7, True) + ("relu", "none")
    yield context_inputs(2, (3, 2), 4, 5, 3, False, torch.bfloat16) + ("gelu", "gelu")
    yield context_inputs(0, (5,), 4, 6, 3, True) + ("tanh", "relu")
    yield context_inputs(3, (4,), 5, 6, 7, True, noncontiguous=True) + ("sigmoid", "tanh")
    yield context_inputs(2, (), 8, 3, 2, True, torch.float64) + ("none", "sigmoid")


@needs_c
@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=["fp32", "bf16-gelu", "B0", "strided", "fp64"])
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.pf_kernels.context_linear.default, sample)


@needs_c
@pytest.mark.parametrize("out_activation", ["none", "relu", "gelu"])
def test_opcheck_backward(out_activation):
    p, z, w, b, pw = context_inputs(3, (4,), 5, 6, 7, True, requires_grad=False)
    out = torch.ops.pf_kernels.context_linear(p, z, w, b, pw, "tanh", out_activation)
    saved_out = out if out_activation == "relu" else None
    saved_p = p if out_activation == "gelu" else None
    torch.library.opcheck(torch.ops.pf_kernels.context_linear_backward.default,
                          (torch.randn_like(out), saved_out, saved_p, z, w, b, pw, "tanh", out_activation))


CONTEXT_BAD = [
    ("p 1-D", dict(p=torch.randn(4)), ValueError, "p"),
    ("z 3-D", dict(z=torch.randn(2, 5, 1)), ValueError, "z"),
    ("batch mismatch", dict(z=torch.randn(3, 5)), ValueError, "batch"),
    ("bp_weight width", dict(bp_weight=torch.randn(6, 4)), ValueError, "bp_weight"),
    ("bp_bias length", dict(bp_bias=torch.randn(5)), ValueError, "bp_bias"),
    ("proj_weight rows", dict(proj_weight=torch.randn(5, 6)), ValueError, "proj_weight"),
    ("proj_weight cols", dict(proj_weight=torch.randn(4, 5)), ValueError, "proj_weight"),
    ("proj_weight 1-D", dict(proj_weight=torch.randn(24)), ValueError, "proj_weight"),
    ("proj_weight dtype", dict(proj_weight=torch.randn(4, 6, dtype=torch.float64)), TypeError, "proj_weight"),
    ("proj_weight not a tensor", dict(proj_weight=[[1.0]]), TypeError, "proj_weight"),
    ("int p", dict(p=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "p"),
    ("mixed device", dict(z=torch.randn(2, 5, device="meta")), ValueError, "device"),
    ("activation", dict(activation="swish"), ValueError, "activation"),
    ("out_activation", dict(out_activation="swish"), ValueError, "out_activation"),
    ("out_activation type", dict(out_activation=None), TypeError, "out_activation"),
]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name,override,exc,word", CONTEXT_BAD, ids=[c[0] for c in CONTEXT_BAD])
def test_bad_input_names_the_argument(name, override, exc, word, backend):
    args = dict(p=torch.randn(2, 3, 4), z=torch.randn(2, 5), bp_weight=torch.randn(6, 5), bp_bias=torch.randn(6),
                proj_weight=torch.randn(4, 6))
    with pytest.raises(exc, match=word):
        pk.context_linear(**{**args, **override}, backend=backend)


@needs_c
def test_direct_calls_of_the_cpp_ops_check_their_arguments():
    ops = torch.ops.pf_kernels
    p, z, w, pw = torch.randn(2, 3, 4), torch.randn(2, 5), torch.randn(6, 5), torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="proj_weight"):
        ops.context_linear(p, z, w, None, torch.randn(4, 5), "relu", "none")
    with pytest.raises(RuntimeError, match="bp_weight"):
        ops.context_linear(p, z, torch.randn(6, 4), None, pw, "relu", "none")
    with pytest.raises(RuntimeError, match="bp_bias"):
        ops.context_linear(p, z, w, torch.randn(5), pw, "relu", "none")
    with pytest.raises(RuntimeError, match="dtype"):
        ops.context_linear(p, z.double(), w, None, pw, "relu", "none")
    with pytest.raises(RuntimeError, match="z must be"):
        ops.context_linear(p, torch.randn(3, 5), w, None, pw, "relu", "none")
    with pytest.raises(ValueError, match="activation"):
        ops.context_linear(p, z, w, None, pw, "relu", "swish")
    with pytest.raises(RuntimeError, match="needs p"):
        ops.context_linear_backward(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, z, w, None, pw, "relu", "gelu")
    with pytest.raises(RuntimeError, match="out must have"):
        ops.context_linear_backward(torch.randn(2, 3, 4), torch.randn(2, 4, 4), None, z, w, None, pw, "relu", "tanh")


@needs_c
def test_auto_picks_cpu_and_the_backends_expose_the_op():
    if os.environ.get("PF_KERNELS_SKIP_EXTENSION") == "1":
        pytest.skip("built without the extension on purpose")
    assert _dispatch.resolve_backend("auto", "context_linear", torch.device("cpu"), torch.float32) == "cpu"
    import pf_kernels._backend_cpu as cpu_backend
    assert cpu_backend.context_linear is torch.ops.pf_kernels.context_linear.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pf_kernels::context_linear", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pf_kernels::context_linear_backward", "CPU")


def test_a_backend_without_the_op_is_skipped_by_auto_and_named_when_asked_for(monkeypatch):
    """The triton backend has no context_linear yet: auto passes over it, asking for it by name
    raises an error naming the op."""
    info = pk.available_backends()["triton"]
    if not info["available"] or "cpu" not in info["devices"]:
        pytest.skip(f"the triton backend does not serve CPU tensors here: {info['reason']}")
    import pf_kernels.triton as tr
    if hasattr(tr, "context_linear"):
        pytest.skip("the triton backend has context_linear now")
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="does not implement context_linear"):
        pk.context_linear(*context_inputs(2, (3,), 4, 5, 6, requires_grad=False), backend="triton")
    assert not _dispatch.implements("triton", "context_linear")
    assert _dispatch.implements("triton", "refine_step") and _dispatch.implements("auto", "context_linear")
    # auto as it orders backends on a GPU, here on CPU tensors: triton first, then the next.
    monkeypatch.setitem(_dispatch._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    assert _dispatch.resolve_backend("auto", "backproj_concat", cpu, torch.float32) == "triton"
    expected = "cpu" if HAS_C else "torch"
    assert _dispatch.resolve_backend("auto", "context_linear", cpu, torch.float32) == expected
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert not _dispatch.implements("auto", "context_linear")
