"""The triton backend against the reference, on CPU tensors through the Triton interpreter (on CUDA
tensors when a GPU is present): every op, odd shapes, B = 0, position dims none/(T,)/(H, W)/more,
every activation, bias or not, strided inputs, fp32/bf16/fp16, forward and every gradient;
torch.compile(fullgraph=True) and torch.library.opcheck on the registered ops.

TRITON_INTERPRET must be set before pf_kernels.triton is imported (the kernels are decorated then),
so it is set here, at collection. backend="auto" still picks "cpu" for CPU tensors.
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import pf_kernels as pk  # noqa: E402
from pf_kernels import reference  # noqa: E402
from tests.cases import (ACTIVATIONS, BACKPROJ_SHAPES, FUSION_SHAPES, assert_matches_reference,  # noqa: E402
                         assert_ops_compile_without_graph_breaks, backproj_call, backproj_inputs, fusion_call, fusion_inputs, rand)

BACKEND = "triton"
_info = pk.available_backends()[BACKEND]
if not _info["available"]:
    pytest.skip(f"triton backend unavailable: {_info['reason']}", allow_module_level=True)
tr = sys.modules["pf_kernels.triton"]
DEVICE = "cpu" if tr.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("pf_kernels.triton was imported before TRITON_INTERPRET=1 was set and there is no GPU; "
                "run this file on its own or set TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COMBOS = [(a, bias) for bias in (True, False) for a in ACTIVATIONS]  # 10


def combos(index, count=2):
    """A rotating pair of (activation, bias): across the cases of one dtype, every one appears."""
    return [COMBOS[(count * index + i) % len(COMBOS)] for i in range(count)]


def test_backend_serves_this_device_and_auto_keeps_cpu():
    assert DEVICE in _info["devices"]
    from pf_kernels._dispatch import resolve_backend
    assert resolve_backend("triton", "refine_step", torch.device(DEVICE), torch.float32) == "triton"
    if DEVICE == "cpu" and pk.available_backends()["cpu"]["available"]:
        assert resolve_backend("auto", "backproj_concat", torch.device("cpu"), torch.float32) == "cpu"
    assert "dtype" in tr.unsupported("fusion_head", torch.device(DEVICE), torch.float64)


@pytest.mark.parametrize("index,shape", list(enumerate(BACKPROJ_SHAPES)), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_backproj_concat(index, shape, dtype, noncontiguous):
    B, S, Dx, Dz, Dc = shape
    for activation, bias in combos(2 * index + noncontiguous):
        args = backproj_inputs(B, S, Dx, Dz, Dc, bias, dtype, DEVICE, noncontiguous=noncontiguous)
        assert_matches_reference(backproj_call(BACKEND, activation), backproj_call("torch", activation), args)


def test_backproj_concat_larger_than_one_block():
    # positions, features and Dz beyond one block of every config the interpreter runs
    args = backproj_inputs(2, (5, 9), 70, 40, 37, True, torch.float32, DEVICE, noncontiguous=True)
    assert_matches_reference(backproj_call(BACKEND, "gelu"), backproj_call("torch", "gelu"), args)


@pytest.mark.parametrize("index,shape", list(enumerate(FUSION_SHAPES + [(5, tuple(range(1, 11)), 6)])),
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_fusion_head(index, shape, dtype, noncontiguous):
    # the last shape has 10 inputs: more than MAX_K, served through a concatenated copy
    B, dims, Dz = shape
    for activation, bias in combos(2 * index + noncontiguous):
        hs, w, b = fusion_inputs(B, dims, Dz, bias, dtype, DEVICE, noncontiguous=noncontiguous)
        assert_matches_reference(fusion_call(BACKEND, activation), fusion_call("torch", activation), (w, b, *hs))


def test_fusion_head_several_tiles():
    hs, w, b = fusion_inputs(70, (40, 3, 33), 70, True, torch.float32, DEVICE, noncontiguous=True)
    assert_matches_reference(fusion_call(BACKEND, "sigmoid"), fusion_call("torch", "sigmoid"), (w, b, *hs))


def _refine_case(dtype, xs_shapes, cs, dims=(4, 5, 6), Dz=7, biases=(True, False, True), B=3,
                 noncontiguous=False):
    hs, hw, hb = fusion_inputs(B, dims, Dz, True, dtype, DEVICE, noncontiguous=noncontiguous)
    xs = [rand((B, *s), dtype, DEVICE, noncontiguous, True) for s in xs_shapes]
    ws = [(rand((c, Dz), torch.float64, DEVICE) * 0.4).to(dtype).requires_grad_(True) for c in cs]
    bs = [rand((c,), dtype, DEVICE, False, True) if has else None for c, has in zip(cs, biases)]
    return hs, hw, hb, xs, ws, bs


def _check_refine(hs, hw, hb, xs, ws, bs, head_act, bp_act):
    k, n = len(hs), len(xs)
    present = [i for i, b in enumerate(bs) if b is not None]

    def step(backend):
        def run(hw_, hb_, *rest):
            h, x, w = list(rest[:k]), list(rest[k:k + n]), list(rest[k + n:k + 2 * n])
            given = iter(rest[k + 2 * n:])
            b = [next(given) if i in present else None for i in range(n)]
            return pk.refine_step(h, hw_, hb_, x, w, b, head_act, bp_act, backend=backend)
        return run

    args = (hw, hb, *hs, *xs, *ws, *[bs[i] for i in present])
    assert_matches_reference(step(BACKEND), step("torch"), args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_refine_step(activation, dtype):
    head_act = ACTIVATIONS[(ACTIVATIONS.index(activation) + 2) % len(ACTIVATIONS)]
    case = _refine_case(dtype, [(4,), (5, 2), (2, 3, 4)], (2, 3, 1),
                        noncontiguous=activation in ("gelu", "sigmoid"))
    _check_refine(*case, head_act, activation)


def test_refine_step_many_positions_and_splits():
    # 40 and 45 positions: several position blocks, so several programs share a batch row;
    # four position dims are merged into three; B beyond one row block.
    case = _refine_case(torch.float32, [(40, 3), (3, 3, 5, 1, 2)], (17, 2), dims=(9, 20), Dz=19,
                        biases=(False, True), B=37, noncontiguous=True)
    _check_refine(*case, "gelu", "tanh")


def test_refine_step_composed_outside_the_one_launch_limits():
    # 5 modalities (> MAX_MODALITIES) and B = 0
    case = _refine_case(torch.float32, [(2,), (3, 1), (1,), (2, 2, 1), (4,)], (1, 2, 3, 2, 1),
                        biases=(True, False, True, False, True))
    _check_refine(*case, "relu", "sigmoid")
    case = _refine_case(torch.bfloat16, [(2,), (3, 1)], (2, 2), biases=(True, True), B=0)
    _check_refine(*case, "relu", "none")


def test_refine_step_beyond_max_dz():
    from pf_kernels.triton.refine_step import MAX_DZ
    case = _refine_case(torch.float32, [(2,), (3, 1)], (2, 3), Dz=MAX_DZ + 3, biases=(True, False))
    _check_refine(*case, "tanh", "relu")


def test_grad_x_is_a_view_of_grad_out():
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 6, True, device=DEVICE, requires_grad=False)
    x.requires_grad_(True)
    out = pk.backproj_concat(x, z, w, b, backend=BACKEND)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    assert gx.data_ptr() == g.data_ptr() and gx.stride() == g.stride()


def test_inference_mode_and_no_grad():
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 6, True, device=DEVICE)
    hs, hw, hb = fusion_inputs(2, (3, 4), 5, device=DEVICE)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(pk.backproj_concat(x, z, w, b, backend=BACKEND),
                                       reference.backproj_concat(x, z, w, b))
            torch.testing.assert_close(pk.fusion_head(hs, hw, hb, "gelu", backend=BACKEND),
                                       reference.fusion_head(hs, hw, hb, "gelu"))
            z1, (x1,) = pk.refine_step(hs, hw, hb, [x], [w[:, :5]], [b], "gelu", backend=BACKEND)
            z2, (x2,) = reference.refine_step(hs, hw, hb, [x], [w[:, :5]], [b], "gelu")
            torch.testing.assert_close(z1, z2)
            torch.testing.assert_close(x1, x2)


def test_tf32_switch_only_changes_fp32_precision_name():
    from pf_kernels.triton._common import TF32_ENV, dot_precision
    old = os.environ.pop(TF32_ENV, None)
    try:
        assert dot_precision(torch.float32) == "ieee"
        os.environ[TF32_ENV] = "1"
        assert dot_precision(torch.float32) == "tf32"
    finally:
        os.environ.pop(TF32_ENV, None)
        if old is not None:
            os.environ[TF32_ENV] = old


def test_compile_fullgraph_without_graph_breaks():
    assert_ops_compile_without_graph_breaks(BACKEND, DEVICE)


def _opcheck_samples():
    x, z, w, b = backproj_inputs(3, (2, 2), 5, 6, 7, True, device=DEVICE)
    yield "backproj_concat", (x, z, w, b, "gelu")
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 3, False, torch.bfloat16, DEVICE, noncontiguous=True)
    yield "backproj_concat", (x, z, w, b, "tanh")
    hs, hw, hb = fusion_inputs(4, (3, 5, 2), 6, device=DEVICE)
    yield "fusion_head", (hs, hw, hb, "gelu", True)
    hs, hw, hb = fusion_inputs(0, (3, 2), 4, False, device=DEVICE)
    yield "fusion_head", (hs, hw, hb, "none", False)
    hs, hw, hb = fusion_inputs(3, (4, 5), 7, device=DEVICE)
    xs = [rand((3, 4), device=DEVICE, requires_grad=True), rand((3, 2, 3), device=DEVICE, requires_grad=True)]
    ws = [(rand((c, 7), device=DEVICE) * 0.4).requires_grad_(True) for c in (2, 3)]
    bs = [rand((3,), device=DEVICE, requires_grad=True)]
    yield "refine_step", (hs, hw, hb, xs, ws, bs, 0b10, "sigmoid", "gelu", True)


@pytest.mark.parametrize("name,args", list(_opcheck_samples()),
                         ids=["backproj", "backproj-bf16", "fusion", "fusion-B0", "refine"])
def test_opcheck(name, args):
    importlib.import_module("pf_kernels.triton")
    torch.library.opcheck(getattr(torch.ops.pf_kernels_triton, name).default, args)


def test_opcheck_backward_ops():
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True, device=DEVICE, requires_grad=False)
    out = pk.backproj_concat(x, z, w, b, "tanh", backend=BACKEND)
    torch.library.opcheck(torch.ops.pf_kernels_triton.backproj_concat_backward.default,
                          (torch.randn_like(out), z, w, b, "tanh", 5))
    hs, hw, hb = fusion_inputs(4, (3, 5), 6, device=DEVICE, requires_grad=False)
    out, pre = torch.ops.pf_kernels_triton.fusion_head(hs, hw, hb, "gelu", True)
    torch.library.opcheck(torch.ops.pf_kernels_triton.fusion_head_backward.default,
                          (torch.randn_like(out), hs, hw, pre, True, "gelu"))
