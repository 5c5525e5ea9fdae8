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
from tests.cases import (ACTIVATIONS, BACKPROJ_SHAPES, CONTEXT_SHAPES, FUSION_SHAPES, assert_matches_reference,
                         assert_refine_step_matches_reference, backproj_call, backproj_inputs, context_call,
                         context_inputs, fusion_call, fusion_inputs)

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


# context_linear beyond the shared cases: the 16-byte path (H a multiple of 8) with positions split
# across blocks in the backward, many positions on the scalar path, many batch rows, one feature.
CONTEXT_EXTRA = [
    (2, (300,), 64, 48, 64),
    (3, (17, 19), 8, 70, 40),
    (1, (2049,), 5, 9, 33),
    (700, (), 16, 33, 8),
    (2, (4,), 1, 5, 3),
]


@needs_gpu
@pytest.mark.parametrize("index,shape", list(enumerate(CONTEXT_SHAPES + CONTEXT_EXTRA)), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contig", "strided"])
def test_context_linear(index, shape, dtype, noncontiguous):
    B, S, H, Dz, Dc = shape
    for i, activation in enumerate(ACTIVATIONS):  # every (activation, out_activation) pair over 5 shapes
        out_activation = ACTIVATIONS[(i + 2 * index + noncontiguous) % 5]
        args = context_inputs(B, S, H, Dz, Dc, (i + index) % 2 == 0, dtype, "cuda", noncontiguous)
        assert_matches_reference(context_call(BACKEND, activation, out_activation),
                                 context_call("torch", activation, out_activation), args)


@needs_gpu
def test_context_linear_unaligned_p_and_grad_p_is_grad_out():
    # p a view starting one element in: rows not 16-byte aligned, so the scalar path must be taken.
    base = torch.randn(2, 5, 17, device="cuda")
    p = base[..., 1:].requires_grad_(False)
    _, z, w, b, pw = context_inputs(2, (5,), 16, 6, 8, True, device="cuda", requires_grad=False)
    for out_activation in ("none", "gelu"):
        torch.testing.assert_close(pk.context_linear(p, z, w, b, pw, "tanh", out_activation, backend=BACKEND),
                                   pk.context_linear(p, z, w, b, pw, "tanh", out_activation, backend="torch"))
    p = p.clone().requires_grad_(True)
    out = pk.context_linear(p, z, w, b, pw, backend=BACKEND)
    g = torch.randn_like(out)
    (gp,) = torch.autograd.grad(out, p, g)
    assert gp.data_ptr() == g.data_ptr()


@needs_gpu
def test_context_linear_gradcheck_float64():
    for activation, out_activation in (("gelu", "none"), ("tanh", "sigmoid"), ("sigmoid", "gelu"), ("none", "tanh")):
        args = context_inputs(2, (3, 2), 4, 3, 2, True, torch.float64, "cuda")
        assert torch.autograd.gradcheck(context_call(BACKEND, activation, out_activation), args)
    args = context_inputs(3, (2,), 3, 4, 2, False, torch.float64, "cuda", noncontiguous=True)
    assert torch.autograd.gradcheck(context_call(BACKEND, "tanh", "tanh"), args)


@needs_gpu
def test_context_linear_opcheck_on_cuda_tensors():
    ops = torch.ops.pf_kernels
    for args in (context_inputs(3, (4,), 5, 6, 7, True, device="cuda") + ("relu", "none"),
                 context_inputs(2, (3, 2), 8, 5, 16, False, torch.bfloat16, "cuda") + ("gelu", "gelu"),
                 context_inputs(0, (5,), 4, 6, 3, True, device="cuda") + ("tanh", "relu"),
                 context_inputs(3, (4,), 5, 6, 7, True, device="cuda", noncontiguous=True) + ("sigmoid", "tanh")):
        torch.library.opcheck(ops.context_linear.default, args)
    p, z, w, b, pw = context_inputs(3, (4,), 5, 6, 7, True, device="cuda", requires_grad=False)
    for out_activation, saved_out, saved_p in (("none", None, None), ("relu", True, None), ("gelu", None, True)):
        out = ops.context_linear(p, z, w, b, pw, "tanh", out_activation)
        torch.library.opcheck(ops.context_linear_backward.default,
                              (torch.randn_like(out), out if saved_out else None, p if saved_p else None, z, w, b,
                               pw, "tanh", out_activation))


@needs_gpu
def test_context_linear_is_deterministic_and_graph_capturable():
    p, z, w, b, pw = context_inputs(4, (3000,), 32, 16, 8, True, device="cuda")
    g = torch.randn(p.shape, device="cuda")

    def grads():
        out = pk.context_linear(p, z, w, b, pw, "tanh", "relu", backend=BACKEND)
        return torch.autograd.grad(out, [p, z, w, b, pw], g)

    first = grads()
    for a, c in zip(first, grads()):
        assert torch.equal(a, c)  # positions reduced in a fixed order
    # No host synchronisation: the forward captures into a CUDA graph and replays equal.
    static_p = p.detach().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        pk.context_linear(static_p, z, w, b, pw, "gelu", "tanh", backend=BACKEND)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = pk.context_linear(static_p, z, w, b, pw, "gelu", "tanh", backend=BACKEND)
    static_p.copy_(torch.randn_like(static_p))
    graph.replay()
    torch.testing.assert_close(static_out, pk.context_linear(static_p, z, w, b, pw, "gelu", "tanh", backend="torch"))


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
