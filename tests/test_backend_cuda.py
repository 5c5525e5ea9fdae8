"""The cuda backend (CUDA kernels of pf_kernels._C) against the reference: the CPU backend's cases
on CUDA tensors (every shape, activation, dtype, layout, bias or not, forward and every gradient),
plus shapes that exercise the kernels' tiling, vector and split paths. These need a GPU.

Without a GPU, one opt-in test compiles the CUDA kernels (.ci/cuda_build_check.sh: no spills, ops
registered): set PF_KERNELS_CUDA_BUILD_CHECK=1; it takes minutes."""
import os
import subprocess
import sys

import pytest
import torch

import pf_kernels as pk
from tests.cases import (ACTIVATIONS, BACKPROJ_SHAPES, FUSION_SHAPES, assert_matches_reference,
                         assert_refine_step_matches_reference, backproj_call, backproj_inputs,
                         fusion_call, fusion_inputs)

BACKEND = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Beyond the shared cases: vector path (Dx, D multiples of 8), many positions (blocks share a batch
# row; backward splits positions), tiles with remainders, Dc with several column tiles, K > 8 inputs
# (the concatenating fallback), empty feature dims.
BACKPROJ_EXTRA = [
    (2, (300,), 64, 48, 64),
    (3, (17, 19), 8, 70, 40),
    (1, (2049,), 5, 9, 33),
    (70, (), 16, 33, 8),
    (2, (4,), 0, 5, 3),
]
FUSION_EXTRA = [
    (130, (64, 100), 70),
    (65, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 17),
    (3, (0, 5), 4),
    (200, (256,), 128),
]


@needs_gpu
def test_cuda_backend_is_built():
    info = pk.available_backends()["cuda"]
    assert info["available"], info["reason"]


@needs_gpu
@pytest.mark.parametrize("shape", BACKPROJ_SHAPES + BACKPROJ_EXTRA, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_backproj_concat(shape, dtype, noncontiguous):
    B, S, Dx, Dz, Dc = shape
    for activation in ACTIVATIONS:
        for bias in (True, False):
            args = backproj_inputs(B, S, Dx, Dz, Dc, bias, dtype, device="cuda", noncontiguous=noncontiguous)
            assert_matches_reference(backproj_call(BACKEND, activation), backproj_call("torch", activation), args)


@needs_gpu
@pytest.mark.parametrize("shape", FUSION_SHAPES + FUSION_EXTRA, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_fusion_head(shape, dtype, noncontiguous):
    B, dims, Dz = shape
    for activation in ACTIVATIONS:
        for bias in (True, False):
            hs, w, b = fusion_inputs(B, dims, Dz, bias, dtype, device="cuda", noncontiguous=noncontiguous)
            assert_matches_reference(fusion_call(BACKEND, activation), fusion_call("torch", activation), (w, b, *hs))


@needs_gpu
def test_backproj_concat_unaligned_x_views():
    # x a view starting one element in: rows not 16-byte aligned, so the scalar path must be taken.
    base = torch.randn(2, 5, 17, device="cuda")
    x = base[..., 1:]
    z, w, b = torch.randn(2, 6, device="cuda"), torch.randn(8, 6, device="cuda"), torch.randn(8, device="cuda")
    out = pk.backproj_concat(x, z, w, b, "tanh", backend=BACKEND)
    torch.testing.assert_close(out, pk.backproj_concat(x, z, w, b, "tanh", backend="torch"))


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_refine_step(activation):
    assert_refine_step_matches_reference(BACKEND, activation, device="cuda")


@needs_gpu
@pytest.mark.parametrize("activation", ["none", "gelu", "tanh", "sigmoid"])
def test_gradcheck_float64(activation):
    args = backproj_inputs(2, (3, 2), 3, 4, 2, True, torch.float64, device="cuda")
    assert torch.autograd.gradcheck(backproj_call(BACKEND, activation), args)
    args = backproj_inputs(2, (3,), 3, 4, 2, False, torch.float64, device="cuda", noncontiguous=True)
    assert torch.autograd.gradcheck(backproj_call(BACKEND, activation), args)
    hs, w, b = fusion_inputs(3, (2, 3, 1), 4, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(fusion_call(BACKEND, activation), (w, b, *hs))


@needs_gpu
def test_only_x_needs_grad():
    x, z, w, b = backproj_inputs(2, (3,), 4, 5, 6, True, device="cuda", requires_grad=False)
    x.requires_grad_(True)
    out = pk.backproj_concat(x, z, w, b, backend=BACKEND)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g[..., :4], rtol=0, atol=0)


@needs_gpu
def test_direct_calls_check_their_arguments():
    pk.available_backends()
    ops = torch.ops.pf_kernels
    x, z, w = (torch.randn(2, 3, 4, device="cuda"), torch.randn(2, 5, device="cuda"),
               torch.randn(6, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="weight"):
        ops.backproj_concat(x, z, torch.randn(6, 4, device="cuda"), None, "relu")
    with pytest.raises(RuntimeError, match="is on"):
        ops.backproj_concat(x, z.cpu(), w, None, "relu")
    with pytest.raises(ValueError, match="activation"):
        ops.fusion_head([z], w, None, "swish")
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.backproj_concat_backward(torch.randn(2, 3, 9, device="cuda"), torch.randn(2, 3, 9, device="cuda"),
                                     z, w, None, "relu", 4)


@needs_gpu
def test_kernels_run_on_the_inputs_device_and_current_stream():
    stream = torch.cuda.Stream()
    x, z, w, b = backproj_inputs(4, (64,), 32, 16, 24, True, device="cuda", requires_grad=False)
    hs, hw, hb = fusion_inputs(4, (8, 9), 10, device="cuda", requires_grad=False)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        out = pk.backproj_concat(x, z, w, b, backend=BACKEND)
        head = pk.fusion_head(hs, hw, hb, backend=BACKEND)
    stream.synchronize()
    torch.testing.assert_close(out, pk.backproj_concat(x, z, w, b, backend="torch"))
    torch.testing.assert_close(head, pk.fusion_head(hs, hw, hb, backend="torch"))


@needs_gpu
def test_opcheck_on_cuda_tensors():
    # Schema, fake kernels, autograd registration and AOT dispatch against the CUDA kernels.
    ops = torch.ops.pf_kernels
    for args in (backproj_inputs(3, (4,), 5, 6, 7, True, device="cuda") + ("relu",),
                 backproj_inputs(2, (3, 2), 8, 5, 16, False, torch.bfloat16, device="cuda") + ("gelu",),
                 backproj_inputs(0, (5,), 4, 6, 3, True, device="cuda") + ("tanh",),
                 backproj_inputs(3, (4,), 5, 6, 7, True, device="cuda", noncontiguous=True) + ("sigmoid",)):
        torch.library.opcheck(ops.backproj_concat.default, args)
    for (hs, w, b), act in ((fusion_inputs(4, (3, 5, 2), 6, device="cuda"), "relu"),
                            (fusion_inputs(3, (4, 4), 5, False, torch.float16, device="cuda"), "gelu"),
                            (fusion_inputs(0, (3, 2), 4, device="cuda"), "none"),
                            (fusion_inputs(5, (7, 1), 3, device="cuda", noncontiguous=True), "sigmoid")):
        torch.library.opcheck(ops.fusion_head.default, (hs, w, b, act))
    x, z, w, b = backproj_inputs(3, (4,), 5, 6, 7, True, device="cuda", requires_grad=False)
    out = ops.backproj_concat(x, z, w, b, "tanh")
    torch.library.opcheck(ops.backproj_concat_backward.default, (torch.randn_like(out), out, z, w, b, "tanh", 5))
    hs, hw, hb = fusion_inputs(4, (3, 5), 6, device="cuda", requires_grad=False)
    out = ops.fusion_head(hs, hw, hb, "relu")
    torch.library.opcheck(ops.fusion_head_backward.default, (torch.randn_like(out), hs, hw, hb, out, "relu"))


@needs_gpu
def test_torch_compile_fullgraph():
    x, z, w, b = backproj_inputs(2, (5,), 4, 6, 3, True, device="cuda")
    hs, hw, hb = fusion_inputs(2, (3, 4), 6, device="cuda")

    def step(x, z, w, b, hw, hb, h0, h1):
        zz = pk.fusion_head([h0, h1], hw, hb, "tanh", backend=BACKEND)
        return pk.backproj_concat(x, z + zz, w, b, "gelu", backend=BACKEND)

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, z, w, b, hw, hb, *hs)
    torch.testing.assert_close(out, step(x, z, w, b, hw, hb, *hs))
    out.sum().backward()
    assert all(t.grad is not None for t in (z, w, b, hw, hb, *hs))


def test_cuda_build_check_script():
    """Compiles the CUDA kernels without a GPU and fails on spills (opt-in: it takes minutes)."""
    if not os.path.exists("/usr/local/cuda/bin/nvcc") and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit (/usr/local/cuda/bin/nvcc)")
    if os.environ.get("PF_KERNELS_CUDA_BUILD_CHECK") != "1":
        pytest.skip("opt-in: set PF_KERNELS_CUDA_BUILD_CHECK=1 to compile the CUDA kernels (minutes)")
    script = os.path.join(ROOT, ".ci", "cuda_build_check.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    if "SKIPPED" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-2])
