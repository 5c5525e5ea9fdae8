"""context_linear: the reference against hand-written loops and against the unhoisted computation
(the encoder's Linear over backproj_concat's output); the cpu and triton backends against the
reference (every dtype each takes, shape, layout, activation, output activation, bias or not,
forward and every gradient); float64 gradcheck (cpu); opcheck; torch.compile; errors; which backend
serves it. The triton backend runs its kernels on CPU tensors through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 where no GPU is visible), on CUDA tensors on a GPU."""
import importlib
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

_TRITON = pk.available_backends()["triton"]
TRITON_DEVICE = "cpu" if "cpu" in _TRITON["devices"] else "cuda"
HAS_TRITON = _TRITON["available"] and (TRITON_DEVICE == "cpu" or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"the triton backend cannot run here: {_TRITON['reason']}")
# The fused backends (the cuda backend's tests are in tests/test_backend_cuda.py): name, marks, device.
FUSED = {"cpu": (needs_c, "cpu"), "triton": (needs_triton, TRITON_DEVICE)}
BACKEND_DTYPES = {"cpu": DTYPES, "triton": [torch.float32, torch.bfloat16, torch.float16]}


def fused(*names):
    return [pytest.param(n, marks=FUSED[n][0], id=n) for n in (names or FUSED)]


def device_of(backend):
    return FUSED[backend][1]


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


def _matches_cases():
    for backend in FUSED:
        # the last shape is sized for the CPU kernel's loops; the interpreter takes a minute per call
        for index, shape in enumerate(CONTEXT_SHAPES if backend == "cpu" else CONTEXT_SHAPES[:-1]):
            for dtype in BACKEND_DTYPES[backend]:
                for noncontiguous in (False, True):
                    yield pytest.param(backend, index, shape, dtype, noncontiguous, marks=FUSED[backend][0],
                                       id=f"{backend}-{index}-{shape}-{str(dtype)[6:]}-"
                                          f"{'strided' if noncontiguous else 'contig'}")


@pytest.mark.parametrize("backend,index,shape,dtype,noncontiguous", list(_matches_cases()))
def test_matches_reference(backend, index, shape, dtype, noncontiguous):
    B, S, H, Dz, Dc = shape
    for activation, out_activation, bias in rotating_combos(2 * index + noncontiguous):
        args = context_inputs(B, S, H, Dz, Dc, bias, dtype, device_of(backend), noncontiguous=noncontiguous)
        assert_matches_reference(context_call(backend, activation, out_activation),
                                 context_call("torch", activation, out_activation), args)


@pytest.mark.parametrize("backend", fused())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_activation", ACTIVATIONS)
def test_every_activation_pair(backend, dtype, out_activation):
    for activation in ACTIVATIONS:
        for bias in (True, False):
            args = context_inputs(3, (4, 2), 9, 5, 6, bias, dtype, device_of(backend), noncontiguous=bias)
            assert_matches_reference(context_call(backend, activation, out_activation),
                                     context_call("torch", activation, out_activation), args)


@pytest.mark.parametrize("backend", fused())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_activation", ["none", "gelu"])
def test_no_context_columns(backend, dtype, out_activation):
    """Dc = 0 (a modality with context_dims 0, hoisted): out_act(p), and empty weight gradients."""
    for activation, bias in (("relu", True), ("tanh", False)):
        args = context_inputs(3, (4,), 9, 5, 0, bias, dtype, device_of(backend))
        assert_matches_reference(context_call(backend, activation, out_activation),
                                 context_call("torch", activation, out_activation), args)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_beyond_one_block_and_a_two_stage_position_sum(dtype):
    from pf_kernels.triton.backproj_concat import chunks
    device = device_of("triton")
    # rows, H and Dz beyond one block of every config; a transposed p (its own position strides)
    p, z, w, b, pw = context_inputs(3, (5, 9), 70, 40, 37, True, dtype, device)
    p = p.detach().transpose(1, 2).requires_grad_(True)
    assert_matches_reference(context_call("triton", "gelu", "tanh"), context_call("torch", "gelu", "tanh"),
                             (p, z, w, b, pw))
    # one batch row, many positions: the sum in chunks, then the chunks in order
    assert chunks(1, 700, 4)[0] > 1
    args = context_inputs(1, (700,), 4, 5, 3, False, dtype, device, noncontiguous=True)
    for out_activation in ("none", "relu", "sigmoid"):
        assert_matches_reference(context_call("triton", "tanh", out_activation),
                                 context_call("torch", "tanh", out_activation), args)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("programs", [3, 9, 512])
def test_triton_forward_row_blocks_and_position_splits(monkeypatch, dtype, programs):
    """The one-launch forward: B = 37 is three row blocks; with PROGRAMS_TARGET = 3 one split per
    row block walks every position block, with 9 three splits walk every third, with 512 each
    takes one."""
    tcl = importlib.import_module("pf_kernels.triton.context_linear")
    monkeypatch.setattr(tcl, "PROGRAMS_TARGET", programs)
    device = device_of("triton")
    for S, noncontiguous in (((40,), False), ((5, 9), True)):
        args = context_inputs(37, S, 40, 20, 18, noncontiguous, dtype, device, noncontiguous=noncontiguous)
        assert_matches_reference(context_call("triton", "relu", "gelu"), context_call("torch", "relu", "gelu"),
                                 args)


@needs_triton
def test_triton_backward_is_deterministic():
    tcl = importlib.import_module("pf_kernels.triton.context_linear")
    p, z, w, b, pw = context_inputs(1, (700,), 4, 5, 3, True, device=device_of("triton"), requires_grad=False)
    g = torch.randn_like(p)
    first = tcl._backward(g, None, p, z, w, b, pw, "gelu", "gelu")
    again = tcl._backward(g, None, p, z, w, b, pw, "gelu", "gelu")
    assert all(torch.equal(u, v) for u, v in zip(first, again))


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


@pytest.mark.parametrize("backend", fused())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_p_is_grad_out_without_an_output_activation(backend, dtype):
    p, z, w, b, pw = context_inputs(2, (3,), 4, 5, 6, True, dtype, device_of(backend), requires_grad=False)
    p.requires_grad_(True)
    out = pk.context_linear(p, z, w, b, pw, backend=backend)
    g = torch.randn_like(out)
    (gp,) = torch.autograd.grad(out, p, g)
    assert gp.data_ptr() == g.data_ptr()  # no copy
    z.requires_grad_(True)
    out = pk.context_linear(p, z, w, b, pw, backend=backend)
    gp, _ = torch.autograd.grad(out, [p, z], g)
    assert gp.data_ptr() == g.data_ptr()


_CUDA_BUILT = pk.available_backends()["cuda"]["available"]
WITH_CUDA = fused() + [pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
    not (_CUDA_BUILT and torch.cuda.is_available()), reason="the cuda backend needs a CUDA GPU (the cpu "
    "kernel keeps the same fp32 sum: its case here is the CPU twin)"))]


@pytest.mark.parametrize("backend", WITH_CUDA)
@pytest.mark.parametrize("out_activation", ["none", "relu"])
def test_fp16_position_sum_beyond_fp16_range_stays_finite(backend, out_activation):
    # 4096 positions of gradient 20: the term's gradient is 81920 > fp16's 65504. The reference sums
    # p + term in fp32, and the gradients that sum feeds are in range: the CUDA kernel rounded the
    # sum to fp16 (inf, then inf/NaN in every gradient but p's).
    device = "cuda" if backend == "cuda" else device_of(backend)
    p, z, w, b, pw = context_inputs(1, (4096,), 2, 3, 2, True, torch.float16, device)
    p = (p.detach().abs() + 1).requires_grad_(True)  # relu on: the gradient passes everywhere
    with torch.no_grad():  # |context| < 0.5 and a small W_c: every gradient but the sum is in range
        pw.mul_(0.01), w.mul_(0.1), b.mul_(0.1)
    g = torch.full(p.shape, 20.0, dtype=torch.float16, device=device)
    grads = torch.autograd.grad(pk.context_linear(p, z, w, b, pw, "tanh", out_activation, backend=backend),
                                [z, w, b, pw], g)
    expected = torch.autograd.grad(reference.context_linear(p, z, w, b, pw, "tanh", out_activation),
                                   [z, w, b, pw], g)
    for name, got, want in zip(("z", "bp_weight", "bp_bias", "proj_weight"), grads, expected):
        assert torch.isfinite(want).all()
        assert torch.isfinite(got).all(), f"grad of {name}: {got}"
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", WITH_CUDA)
@pytest.mark.parametrize("op", ["backproj_concat", "context_linear"])
def test_fp16_context_gradient_beyond_fp16_range_stays_finite(backend, op):
    # The context's pre-activation gradient sums over positions: 8192 positions of gradient 10 give
    # 81920 (times W_c's column for context_linear) > fp16's 65504, while the gradients of z and the
    # weights it feeds (small z, W) are in range. Eager rounds it to fp16 (inf, then inf/NaN): the
    # fused backends keep it in fp32 (the cuda backend rounded it, as eager). Against float64.
    device = "cuda" if backend == "cuda" else device_of(backend)
    p, z, w, _, pw = context_inputs(1, (8192,), 2, 3, 2, False, torch.float16, device, requires_grad=False)
    z, w = z * 0.01, w * 0.1
    pw = torch.ones_like(pw)  # W_c's columns add up: grad_c = 2 * 81920 per element
    g = torch.full(p.shape, 10.0, dtype=torch.float16, device=device)

    def grads(impl, dtype, **backend):
        p_, z_, w_, pw_, g_ = (t.detach().to(dtype) for t in (p, z, w, pw, g))
        wrt = [t.requires_grad_(True) for t in ([z_, w_, pw_] if op == "context_linear" else [z_, w_])]
        if op == "context_linear":
            out = impl.context_linear(p_, z_, w_, None, pw_, "none", "none", **backend)
        else:  # the gradient of x's features too, the context's alone beyond fp16
            out = impl.backproj_concat(p_, z_, w_, None, "none", **backend)
            g_ = torch.cat([g_, g_], -1)
        return torch.autograd.grad(out, wrt, g_)

    got = grads(pk, torch.float16, backend=backend)
    want = grads(reference, torch.float64)
    for name, a, e in zip(("z", "weight", "proj_weight"), got, want):
        assert torch.isfinite(e).all() and e.abs().max() < 60000
        assert torch.isfinite(a).all(), f"grad of {name}: {a}"
        torch.testing.assert_close(a.double(), e, rtol=2e-2, atol=1e-1, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", fused())
def test_only_some_inputs_need_grad(backend):
    for needs in ([0], [1], [2], [4], [0, 3]):
        for out_activation in ("none", "tanh", "relu"):
            args = list(context_inputs(2, (3,), 4, 5, 6, True, device=device_of(backend), requires_grad=False))
            for i in needs:
                args[i].requires_grad_(True)
            got = torch.autograd.grad(context_call(backend, "gelu", out_activation)(*args).square().sum(),
                                      [args[i] for i in needs])
            want = torch.autograd.grad(context_call("torch", "gelu", out_activation)(*args).square().sum(),
                                       [args[i] for i in needs])
            for a, e in zip(got, want):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", fused())
def test_inference_mode_and_no_grad(backend):
    args = context_inputs(2, (3,), 4, 5, 6, True, device=device_of(backend))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            for out_activation in ("none", "sigmoid"):
                torch.testing.assert_close(pk.context_linear(*args, "tanh", out_activation, backend=backend),
                                           reference.context_linear(*args, "tanh", out_activation))


@pytest.mark.parametrize("backend", fused())
def test_nan_reaches_the_output_as_torch_relu_keeps_it(backend):
    p, z, w, b, pw = context_inputs(2, (3,), 4, 5, 6, True, device=device_of(backend), requires_grad=False)
    p[0, 1, 2] = float("nan")
    out = pk.context_linear(p, z, w, b, pw, "tanh", "relu", backend=backend)
    assert torch.isnan(out[0, 1, 2]) and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend", fused())
@pytest.mark.parametrize("p_dims", [2, 3, 5], ids=lambda n: f"{n}-D p")
def test_compile_fullgraph_forward_and_backward(backend, p_dims):
    import torch._dynamo
    S = (3, 2, 2)[:p_dims - 2]
    args = context_inputs(3, S, 5, 4, 6, True, device=device_of(backend))
    if p_dims == 5:  # strided p
        args = (args[0].detach().transpose(1, 3).requires_grad_(True), *args[1:])

    def step(p, z, w, b, pw):
        return [pk.context_linear(p, z, w, b, pw, "gelu", out_activation, backend=backend)
                for out_activation in ACTIVATIONS]

    def outputs_and_grads(fn):
        outs = fn(*args)
        return outs + list(torch.autograd.grad([o.square().sum() for o in outs], args))

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    for got, want in zip(outputs_and_grads(torch.compile(step, fullgraph=True)), outputs_and_grads(step)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _opcheck_samples(device="cpu", fp64=True):
    yield context_inputs(3, (4,), 5, 6, 7, True, device=device) + ("relu", "none")
    yield context_inputs(2, (3, 2), 4, 5, 3, False, torch.bfloat16, device) + ("gelu", "gelu")
    yield context_inputs(0, (5,), 4, 6, 3, True, device=device) + ("tanh", "relu")
    yield context_inputs(3, (4,), 5, 6, 7, True, device=device, noncontiguous=True) + ("sigmoid", "tanh")
    yield context_inputs(2, (), 8, 3, 2, True, torch.float64 if fp64 else torch.float16, device) + ("none", "sigmoid")


OPCHECK_IDS = ["fp32", "bf16-gelu", "B0", "strided", "2-D p"]


@needs_c
@pytest.mark.parametrize("index", range(5), ids=OPCHECK_IDS)
def test_opcheck(index):
    sample = list(_opcheck_samples())[index]
    torch.library.opcheck(torch.ops.pf_kernels.context_linear.default, sample)


@needs_triton
@pytest.mark.parametrize("index", range(5), ids=OPCHECK_IDS)
def test_opcheck_triton(index):
    import pf_kernels.triton  # noqa: F401  (registers the ops)
    sample = list(_opcheck_samples(device_of("triton"), fp64=False))[index]
    torch.library.opcheck(torch.ops.pf_kernels_triton.context_linear.default, sample)


def _backward_sample(ops, out_activation, device="cpu"):
    p, z, w, b, pw = context_inputs(3, (4,), 5, 6, 7, out_activation != "relu", device=device, requires_grad=False)
    out = ops.context_linear(p, z, w, b, pw, "tanh", out_activation)
    saved_out = out if out_activation == "relu" else None
    saved_p = p if out_activation not in ("none", "relu") else None
    return (torch.randn_like(out), saved_out, saved_p, z, w, b, pw, "tanh", out_activation)


@needs_c
@pytest.mark.parametrize("out_activation", ["none", "relu", "gelu"])
def test_opcheck_backward(out_activation):
    torch.library.opcheck(torch.ops.pf_kernels.context_linear_backward.default,
                          _backward_sample(torch.ops.pf_kernels, out_activation))


@needs_triton
@pytest.mark.parametrize("out_activation", ["none", "relu", "gelu"])
def test_opcheck_backward_triton(out_activation):
    import pf_kernels.triton  # noqa: F401
    torch.library.opcheck(torch.ops.pf_kernels_triton.context_linear_backward.default,
                          _backward_sample(torch.ops.pf_kernels_triton, out_activation, device_of("triton")))


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


@needs_triton
def test_triton_serves_it_auto_can_pick_it_and_a_backend_without_it_is_skipped(monkeypatch):
    import pf_kernels.triton as tr
    device = torch.device(device_of("triton"))
    assert _dispatch.resolve_backend("triton", "context_linear", device, torch.float32) == "triton"
    assert _dispatch.implements("triton", "context_linear")
    # auto in the order it has on a GPU (cuda, then triton), here for this device: triton first
    monkeypatch.setitem(_dispatch._AUTO_ORDER, device.type, {"*": ("triton", "torch")})
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    assert _dispatch.resolve_backend("auto", "context_linear", device, torch.float32) == "triton"
    assert _dispatch.resolve_backend("auto", "context_linear", device, torch.float64) == "torch"
    # a backend without the op: auto passes over it, asking for it by name names the op
    monkeypatch.delattr(tr, "context_linear")
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    assert _dispatch.resolve_backend("auto", "context_linear", device, torch.float32) == "torch"
    assert not _dispatch.implements("triton", "context_linear")
    with pytest.raises(RuntimeError, match="does not implement context_linear"):
        pk.context_linear(*context_inputs(2, (3,), 4, 5, 6, device=device, requires_grad=False), backend="triton")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert not _dispatch.implements("auto", "context_linear")
