"""A strided matmul C = act(A @ B + bias) (fp32 accumulate, tl.dot), for the back-projection's
context and the weight-side gradients."""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._activations import _pow2, act
from ._common import INTERPRET, act_code, autotune, cdiv, dot_precision, launch, size_class

# Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits in tl.dot; there we
# upcast them to fp32 (exact products, fp32 accumulation as on the GPU). Compiled kernels never do.
_UPCAST_BF16_DOT = tl.constexpr(INTERPRET)

MM_CONFIGS = [
    dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=2),
    dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3),
]
MM_CONFIGS_FP32 = [  # fp32 (FMA) dots hold their whole BK slice in registers per thread
    dict(BM=32, BN=32, BK=16, num_warps=4, num_stages=2),
    # 64x64 on 8 warps spilled 4-8 B (triton 3.6) and 64x32 in 3 stages 8 B (triton 3.9, sm_80): no spills here
    dict(BM=64, BN=32, BK=16, num_warps=4, num_stages=2),
]


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation (tensor cores for 16-bit operands)."""
    if _UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def dot_split(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b for an fp32 a (a gradient) and b in the input dtype. For 16-bit b, a enters
    as hi + lo in b's dtype: two tensor-core dots that keep ~16 bits of a, not 8, so gradients match
    an fp32 reference as closely as eager PyTorch's (which computes these in fp32).
    fp16 holds neither a gradient beyond 65504 (inf, then NaN) nor the low bits of one below 2^-14
    (subnormal): the tile of a, and acc, are first scaled by a power of two (exact) that brings the
    tile's largest |a| to [2^14, 2^15), within 2^+-24; the result is scaled back. (A scale per row
    spilled on sm_80.) An inf or NaN in a passes through hi alone (lo is 0 there: inf - inf is NaN),
    and the scale is set by the finite |a| (an inf set it to 2^-24, flushing the tile's other values);
    one in b too (lo's dot reads 0 there: lo * inf is NaN where lo is 0)."""
    if b.dtype == tl.float32:
        return dot(a, b, acc, PREC)
    if b.dtype == tl.float16:
        amax = tl.max(_finite(tl.abs(a)))
        exponent = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(amax))
        k = tl.minimum(tl.maximum(14 - exponent, -24), 24)
        scale, unscale = _pow2(k), _pow2(-k)
        a = a * scale
        hi = a.to(b.dtype)
        return dot(_low_part(a, hi), _finite(b), dot(hi, b, acc * scale, PREC), PREC) * unscale
    hi = a.to(b.dtype)
    return dot(_low_part(a, hi), _finite(b), dot(hi, b, acc, PREC), PREC)


@triton.jit
def _low_part(a, hi):
    """a - hi in hi's dtype; 0 where hi is not finite (an inf or NaN of a, or beyond the dtype's range:
    a - hi is then not finite either)."""
    return _finite(a - hi.to(tl.float32)).to(hi.dtype)


@triton.jit
def _finite(b):
    """b with its infs and NaNs read as 0."""
    return tl.where(tl.abs(b.to(tl.float32)) < float("inf"), b, 0.0).to(b.dtype)


@triton.jit(do_not_specialize=["M", "N", "K", "SIZE_CLASS"])
def mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn, sbias, SIZE_CLASS,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # one axis of programs (CUDA limits axes 1 and 2 to 65535): tile (pid // tiles_n, pid % tiles_n)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    offs_m = (pid // tiles_n).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = (pid % tiles_n).to(tl.int64) * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)  # K * stride may pass 2^31 (K = batch)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * sbk + offs_n[None, :] * sbn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if a.dtype == b.dtype:
            acc = dot(a, b, acc, PREC)
        else:
            acc = dot_split(a.to(tl.float32), b, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * sbias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn,
             act(acc, ACT).to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


mm_tuned = autotune("mm", mm_kernel, MM_CONFIGS, key=["SIZE_CLASS"])
mm_tuned_fp32 = autotune("mm_fp32", mm_kernel, MM_CONFIGS_FP32, key=["SIZE_CLASS"])


def mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
       activation: str = "none") -> torch.Tensor:
    """act(a (M, K) @ b (K, N) + bias (N,)) -> (M, N) contiguous in out_dtype; any strides; a may be
    fp32 while b is 16-bit (a gradient times an input)."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c

    def grid(meta):
        return (cdiv(M, meta["BM"]) * cdiv(N, meta["BN"]),)

    launch(mm_tuned_fp32 if b.dtype == torch.float32 else mm_tuned, grid,
           a, b, c, bias if bias is not None else c.new_empty((0,)), M, N, K,
           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
           bias.stride(0) if bias is not None else 0, size_class(M, N, K),
           HAS_BIAS=bias is not None, ACT=act_code(activation), PREC=dot_precision(b.dtype))
    return c
