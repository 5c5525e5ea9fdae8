"""A small strided matmul C = A @ B (fp32 accumulate, tl.dot), for the weight-side gradients."""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, configs, dot_precision, launch

# Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits in tl.dot; there we
# upcast them to fp32 (exact products, fp32 accumulation as on the GPU). Compiled kernels never do.
_UPCAST_BF16_DOT = tl.constexpr(INTERPRET)

MM_CONFIGS = [
    dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=2),
    dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3),
]
MM_CONFIGS_FP32 = [  # fp32 dots hold more in registers
    dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=2),
    dict(BM=64, BN=64, BK=16, num_warps=8, num_stages=3),
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
    an fp32 reference as closely as eager PyTorch's (which computes these in fp32)."""
    if b.dtype == tl.float32:
        return dot(a, b, acc, PREC)
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    return dot(lo, b, dot(hi, b, acc, PREC), PREC)


@triton.jit
def mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
              PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * sbk + offs_n[None, :] * sbn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_split(a.to(tl.float32), b, acc, PREC)
    tl.store(c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


mm_tuned = triton.autotune(configs(MM_CONFIGS), key=["M", "N", "K"])(mm_kernel)
mm_tuned_fp32 = triton.autotune(configs(MM_CONFIGS_FP32), key=["M", "N", "K"])(mm_kernel)


def mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) in out_dtype; any strides; a may be fp32 while b is 16-bit."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))

    launch(mm_tuned_fp32 if b.dtype == torch.float32 else mm_tuned)[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                           c.stride(0), c.stride(1), PREC=dot_precision(b.dtype))
    return c
