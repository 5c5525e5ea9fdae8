"""backproj_concat in Triton: out = cat([x, act(z @ W.T + b) over every position], -1).

Forward: one launch; program (b, p-block) computes its batch row's context in fp32 registers and
writes the x part and the context part of its rows. Backward: grad_x is a view of grad_out; one
kernel reduces grad_out's context part over positions into grad_pre (B, Dc) fp32 (recomputing the
pre-activation from z, W, b: gelu's derivative needs it, and it is exact in bf16 where the saved
output is not); grad_z and grad_weight are tl.dot matmuls of grad_pre, grad_bias its column sum.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._activations import act, act_grad
from ._common import act_code, configs, define_op, launch, positions
from ._matmul import mm

FWD_CONFIGS = [  # tiles of at most 16 elements per thread: no spills
    dict(BLOCK_P=32, BLOCK_D=64, BLOCK_C=32, BLOCK_K=32, num_warps=4),
    dict(BLOCK_P=64, BLOCK_D=64, BLOCK_C=64, BLOCK_K=32, num_warps=8),
]
GRAD_PRE_CONFIGS = [
    dict(BLOCK_P=32, BLOCK_C=32, BLOCK_K=32, num_warps=4),
    dict(BLOCK_P=64, BLOCK_C=64, BLOCK_K=32, num_warps=8),
]


@triton.jit
def context_block(z_row, w_ptr, b_ptr, offs_c, mask_c, Dz, szk, swc, swk, sb,
                  HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    """z_row @ W[offs_c].T + b[offs_c] in fp32: the pre-activation of one batch row's context."""
    acc = tl.zeros([offs_c.shape[0]], tl.float32)
    for k0 in range(0, Dz, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < Dz
        zv = tl.load(z_row + offs_k * szk, mask=mask_k, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + offs_c[:, None] * swc + offs_k[None, :] * swk,
                     mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(wv * zv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c * sb, mask=mask_c, other=0.0).to(tl.float32)
    return acc


@triton.jit
def position_offsets(offs_p, S1, S2, s0, s1, s2):
    """Element offsets of flat positions offs_p (int64) in a (S0, S1, S2) grid with strides s*."""
    i2 = offs_p % S2
    t = offs_p // S2
    return (t // S1) * s0 + (t % S1) * s1 + i2 * s2


@triton.jit
def backproj_fwd_kernel(x_ptr, z_ptr, w_ptr, b_ptr, out_ptr,
                        P, S1, S2, Dx, Dz, Dc,
                        sxb, sx0, sx1, sx2, sxd, szb, szk, swc, swk, sb,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    x_rows = x_ptr + b * sxb + position_offsets(offs_p, S1, S2, sx0, sx1, sx2)
    out_rows = out_ptr + (b * P + offs_p) * (Dx + Dc)
    for d0 in range(0, Dx, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_p[:, None] & (offs_d[None, :] < Dx)
        v = tl.load(x_rows[:, None] + offs_d[None, :] * sxd, mask=m)
        tl.store(out_rows[:, None] + offs_d[None, :], v, mask=m)
    for c0 in range(0, Dc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < Dc
        pre = context_block(z_ptr + b * szb, w_ptr, b_ptr, offs_c, mask_c, Dz, szk, swc, swk, sb,
                            HAS_BIAS, BLOCK_K)
        ctx = act(pre, ACT).to(out_ptr.dtype.element_ty)
        tl.store(out_rows[:, None] + Dx + offs_c[None, :],
                 tl.broadcast_to(ctx[None, :], [BLOCK_P, BLOCK_C]),
                 mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def backproj_grad_pre_kernel(g_ptr, z_ptr, w_ptr, b_ptr, gp_ptr,
                             P, S1, S2, Dx, Dz, Dc,
                             sgb, sg0, sg1, sg2, sgd, szb, szk, swc, swk, sb,
                             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < Dc
    gsum = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    g_row = g_ptr + b * sgb + (Dx + offs_c) * sgd
    for p0 in range(0, P, BLOCK_P):
        offs_p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        rows = position_offsets(offs_p, S1, S2, sg0, sg1, sg2)
        gsum += tl.load(g_row[None, :] + rows[:, None],
                        mask=(offs_p < P)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    g = tl.sum(gsum, axis=0)
    if ACT != 0:
        pre = context_block(z_ptr + b * szb, w_ptr, b_ptr, offs_c, mask_c, Dz, szk, swc, swk, sb,
                            HAS_BIAS, BLOCK_K)
        g = g * act_grad(pre, ACT)
    tl.store(gp_ptr + b * Dc + offs_c, g, mask=mask_c)


backproj_fwd = triton.autotune(configs(FWD_CONFIGS), key=["P", "Dx", "Dz", "Dc"])(backproj_fwd_kernel)
backproj_grad_pre = triton.autotune(configs(GRAD_PRE_CONFIGS), key=["P", "Dz", "Dc"])(
    backproj_grad_pre_kernel)


def launch_forward(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], activation: str, out: torch.Tensor) -> None:
    """Writes backproj_concat(x, z, ...) into out (contiguous, (B, *S, Dx + Dc))."""
    B, Dx, Dz, Dc = x.shape[0], x.shape[-1], z.shape[1], weight.shape[0]
    if out.numel() == 0:
        return
    x3, (S0, S1, S2), (s0, s1, s2) = positions(x)
    P = S0 * S1 * S2
    b = bias if bias is not None else weight  # never read without HAS_BIAS

    def grid(meta):
        return (B, triton.cdiv(P, meta["BLOCK_P"]))

    launch(backproj_fwd)[grid](
        x3, z, weight, b, out, P, S1, S2, Dx, Dz, Dc,
        x3.stride(0), s0, s1, s2, x3.stride(-1), z.stride(0), z.stride(1),
        weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, ACT=act_code(activation))


def _forward(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str) -> torch.Tensor:
    out = torch.empty((*x.shape[:-1], x.shape[-1] + weight.shape[0]), dtype=x.dtype, device=x.device)
    launch_forward(x, z, weight, bias, activation, out)
    return out


def _forward_fake(x, z, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] + weight.shape[0]))


def _backward(grad_out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], activation: str, x_features: int) -> List[torch.Tensor]:
    """[grad_z, grad_weight, grad_bias (fp32 sum of grad_pre, in the input dtype)]."""
    B, Dz, Dc = z.shape[0], z.shape[1], weight.shape[0]
    grad_pre = torch.empty((B, Dc), dtype=torch.float32, device=z.device)
    if B > 0:
        g3, (S0, S1, S2), (s0, s1, s2) = positions(grad_out)
        P = S0 * S1 * S2
        b = bias if bias is not None else weight

        def grid(meta):
            return (B, triton.cdiv(Dc, meta["BLOCK_C"]))

        launch(backproj_grad_pre)[grid](
            g3, z, weight, b, grad_pre, P, S1, S2, x_features, Dz, Dc,
            g3.stride(0), s0, s1, s2, g3.stride(-1), z.stride(0), z.stride(1),
            weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None, ACT=act_code(activation))
    grad_z = mm(grad_pre, weight, z.dtype)
    grad_weight = mm(grad_pre.t(), z, z.dtype)
    grad_bias = grad_pre.sum(0).to(z.dtype)
    return [grad_z, grad_weight, grad_bias]


def _backward_fake(grad_out, z, weight, bias, activation, x_features):
    return [torch.empty_like(z), torch.empty_like(weight), weight.new_empty((weight.shape[0],))]


backproj_concat_op = define_op("backproj_concat", _forward, _forward_fake)
backproj_concat_backward_op = define_op("backproj_concat_backward", _backward, _backward_fake)


def _setup_context(ctx, inputs, output):
    x, z, weight, bias, activation = inputs
    ctx.save_for_backward(z, weight, bias)
    ctx.activation = activation
    ctx.x_features = x.shape[-1]


def _autograd_backward(ctx, grad_out):
    z, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_out[..., :ctx.x_features] if need[0] else None  # a view: no copy
    grad_z = grad_weight = grad_bias = None
    if need[1] or need[2] or need[3]:
        grad_z, grad_weight, grad_bias = backproj_concat_backward_op(
            grad_out, z, weight, bias, ctx.activation, ctx.x_features)
    return (grad_x, grad_z if need[1] else None, grad_weight if need[2] else None,
            grad_bias if bias is not None and need[3] else None, None)


backproj_concat_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def backproj_concat(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, activation: str = "relu") -> torch.Tensor:
    return backproj_concat_op(x, z, weight, bias, activation)
