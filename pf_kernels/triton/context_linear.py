"""context_linear in Triton: out = out_act(p + act(z @ W_bp.T + b) @ W_c.T over every position).

Forward, one launch (context_linear_kernel): program (block of BM batch rows, split s) computes its
rows of the context c = act(z @ W_bp.T + b) (tl.dot, fp32) rounded to p's dtype as
backproj_concat returns it, stores them to a (B, Dc) scratch and reads them back in BC-wide chunks
(a whole [BM, Dc] operand would not fit the registers); then, block by block of H, the term
c @ W_c.T in fp32 (tl.dot) and, over its share of the positions (split s takes every nsplit-th
position block, so small batches still fill the GPU), out = out_act(p + term), rounded once. Every
split of a row block stores the same context values; each reads back what it wrote.

Backward (its own op, as the other ops): one pass over grad_out (context_reduce_kernel) writes
grad_p = grad_out * out_act'(pre) (pre = p + term recomputed in fp32; relu' from the saved output,
as torch does) and sums grad_pre over positions into g (B, H) fp32, in the same deterministic
two-stage plan as backproj_concat's reduction (its second stage is that op's reduce kernel).
Without an output activation grad_p is grad_out itself (no copy: autograd hands it back). Then
grad_W_c = g.T @ c, and grad_c = g @ W_c (fp32) enters backproj_concat's backward as a gradient
of one position: act'(z @ W_bp.T + b), grad_z, grad_W_bp, grad_b, all with that op's kernels.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._validation import check_context_linear
from ._activations import act, grad_through
from ._common import (PROGRAMS_TARGET, act_code, autotune, cdiv, define_op, dot_precision, launch, positions, savable,
                      size_class, smax, smin)
from ._differentiated import context_linear_parts, differentiated, fresh, gradients, without_autocast
from ._matmul import dot, mm, mm_tuned, mm_tuned_fp32
from .backproj_concat import (_backward as backproj_backward, _reduce as backproj_reduce_stage,
                              backproj_reduce, chunks, position_offsets)

FORWARD_CONFIGS = [  # the [BM, BP, BH] tiles of p hold at most 8 elements per thread
    dict(BM=16, BK=32, BC=32, BP=2, BH=32, num_warps=4, num_stages=2),
    dict(BM=16, BK=32, BC=32, BP=4, BH=32, num_warps=8, num_stages=2),
]
FORWARD_CONFIGS_FP32 = [  # fp32 (FMA) dots hold their whole K slice in registers per thread; BP=4 on 8
    # warps spilled 12 B with tf32 (sm_90, triton 3.8)
    dict(BM=16, BK=16, BC=16, BP=2, BH=32, num_warps=8, num_stages=2),
    dict(BM=16, BK=16, BC=16, BP=2, BH=64, num_warps=8, num_stages=2),
]
REDUCE_CONFIGS = [  # 8 elements per thread: act' of gelu with two int64 address tiles (g and the
    # saved tensor) spilled at 16 (sm_90, 4 warps)
    dict(BLOCK_P=16, BLOCK_H=64, num_warps=4),
    dict(BLOCK_P=32, BLOCK_H=64, num_warps=8),
]


@triton.jit
def store_context(z_ptr, szm, szk, Dz, bw_ptr, sbwc, sbwk, bb_ptr, sbb, c_ptr, ldc, Dc, offs_m, mask_m,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                  BK: tl.constexpr, BC: tl.constexpr):
    """Rows offs_m of the context act(z @ W_bp.T + b) (tl.dot, fp32), rounded to c's dtype, into c
    (rows ldc apart)."""
    for c0 in range(0, Dc, BC):
        offs_c = (c0 + tl.arange(0, BC)).to(tl.int64)
        mask_c = offs_c < Dc
        ctx = tl.zeros([BM, BC], tl.float32)
        for k0 in range(0, Dz, BK):
            offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
            mask_k = offs_k < Dz
            zt = tl.load(z_ptr + offs_m[:, None] * szm + offs_k[None, :] * szk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(bw_ptr + offs_c[None, :] * sbwc + offs_k[:, None] * sbwk,
                         mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            ctx = dot(zt, wt, ctx, PREC)
        if HAS_BIAS:
            ctx += tl.load(bb_ptr + offs_c * sbb, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + offs_m[:, None] * ldc + offs_c[None, :], act(ctx, ACT).to(c_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def add_term(c_ptr, ldc, Dc, pw_ptr, spwh, spwc, p_ptr, spb, sp0, sp1, sp2, sph, P, S1, S2, H, out_ptr,
             offs_m, mask_m, split, nsplit, OUT_ACT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
             BC: tl.constexpr, BP: tl.constexpr, BH: tl.constexpr):
    """out = out_act(p + c @ W_c.T) (fp32, rounded once) for rows offs_m, over the position blocks
    of this split (every nsplit-th); c's rows ldc apart, out contiguous."""
    p_rows = p_ptr + offs_m * spb
    out_rows = out_ptr + offs_m * P * H
    for h0 in range(0, H, BH):
        offs_h = (h0 + tl.arange(0, BH)).to(tl.int64)  # the feature stride may be large
        mask_h = offs_h < H
        term = tl.zeros([BM, BH], tl.float32)
        for c0 in range(0, Dc, BC):
            offs_c = c0 + tl.arange(0, BC)
            mask_c = offs_c < Dc
            ct = tl.load(c_ptr + offs_m[:, None] * ldc + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :],
                         other=0.0)
            wt = tl.load(pw_ptr + offs_h[None, :] * spwh + offs_c.to(tl.int64)[:, None] * spwc,
                         mask=mask_c[:, None] & mask_h[None, :], other=0.0)
            term = dot(ct, wt, term, PREC)
        for p0 in range(split * BP, P, nsplit * BP):
            offs_p = p0 + tl.arange(0, BP)
            mask = (mask_m[:, None, None] & (offs_p < P)[None, :, None]) & mask_h[None, None, :]
            src = p_rows[:, None, None] + position_offsets(offs_p, S1, S2, sp0, sp1, sp2)[None, :, None] \
                + offs_h[None, None, :] * sph
            v = tl.load(src, mask=mask, other=0.0).to(tl.float32) + term[:, None, :]
            dst = out_rows[:, None, None] + offs_p.to(tl.int64)[None, :, None] * H + offs_h[None, None, :]
            tl.store(dst, act(v, OUT_ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "Dz", "Dc", "H", "SIZE_CLASS"], do_not_specialize_on_alignment=["P"])
def context_linear_kernel(p_ptr, z_ptr, bw_ptr, bb_ptr, pw_ptr, c_ptr, out_ptr, M, Dz, Dc, H, P, S1, S2,
                          spb, sp0, sp1, sp2, sph, szm, szk, sbwc, sbwk, sbb, spwh, spwc, SIZE_CLASS,
                          HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_ACT: tl.constexpr, PREC: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                          BH: tl.constexpr):
    offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    mask_m = offs_m < M
    store_context(z_ptr, szm, szk, Dz, bw_ptr, sbwc, sbwk, bb_ptr, sbb, c_ptr, Dc, Dc, offs_m, mask_m,
                  HAS_BIAS, ACT, PREC, BM, BK, BC)
    tl.debug_barrier()  # this program's context stores are visible to all its threads
    add_term(c_ptr, Dc, Dc, pw_ptr, spwh, spwc, p_ptr, spb, sp0, sp1, sp2, sph, P, S1, S2, H, out_ptr,
             offs_m, mask_m, tl.program_id(1), tl.num_programs(1), OUT_ACT, PREC, BM, BC, BP, BH)


@triton.jit(do_not_specialize=["CH", "NCH", "H", "SIZE_CLASS"],
            do_not_specialize_on_alignment=["P"])
def context_reduce_kernel(g_ptr, s_ptr, term_ptr, gp_ptr, sum_ptr, P, CH, NCH, S1, S2, T1, T2, H,
                          sgb, sg0, sg1, sg2, sgh, ssb, ss0, ss1, ss2, ssh, SIZE_CLASS,
                          OUT_ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (b, chunk s, column block): grad_pre = g * out_act'(pre) at positions s*CH ..
    s*CH+CH-1, written to grad_p (contiguous) unless OUT_ACT is none, and its fp32 sum over those
    positions into sum (B, NCH, H) at chunk s. The saved tensor s is the output for relu, p for
    the other activations (pre = p + term); g and s each have their own merged position dims
    (S1, S2 and T1, T2) over the same position numbers."""
    pid = tl.program_id(0)
    tiles_h = tl.cdiv(H, BLOCK_H)
    t = pid // tiles_h
    s = t % NCH
    b = (t // NCH).to(tl.int64)
    offs_h = (pid % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    g_row = g_ptr + b * sgb + offs_h.to(tl.int64) * sgh
    s_row = s_ptr + b * ssb + offs_h.to(tl.int64) * ssh
    gp_row = gp_ptr + b * P * H + offs_h
    if OUT_ACT > 1:
        term = tl.load(term_ptr + b * H + offs_h, mask=mask_h, other=0.0)
    p_start = s * CH
    p_end = p_start + tl.minimum(CH, P - p_start)  # (p_start + CH may pass 2^31)
    gsum = tl.zeros([BLOCK_P, BLOCK_H], tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = (offs_p < p_end)[:, None] & mask_h[None, :]
        g = tl.load(g_row[None, :] + position_offsets(offs_p, S1, S2, sg0, sg1, sg2)[:, None],
                    mask=m, other=0.0).to(tl.float32)
        if OUT_ACT != 0:
            saved = tl.load(s_row[None, :] + position_offsets(offs_p, T1, T2, ss0, ss1, ss2)[:, None],
                            mask=m, other=0.0).to(tl.float32)
            if OUT_ACT != 1:  # (relu's from its output: the pre-activation's sign, NaN included)
                saved = saved + term[None, :]
            g = grad_through(g, saved, OUT_ACT)
            tl.store(gp_row[None, :] + offs_p.to(tl.int64)[:, None] * H, g.to(gp_ptr.dtype.element_ty), mask=m)
        gsum += g
    tl.store(sum_ptr + (b * NCH + s) * H + offs_h, tl.sum(gsum, axis=0), mask=mask_h)


context_forward = autotune("context_linear", context_linear_kernel, FORWARD_CONFIGS, key=["SIZE_CLASS"])
context_forward_fp32 = autotune("context_linear_fp32", context_linear_kernel, FORWARD_CONFIGS_FP32,
                                key=["SIZE_CLASS"])
context_reduce = autotune("context_reduce", context_reduce_kernel, REDUCE_CONFIGS, key=["SIZE_CLASS"])


def _forward(p: torch.Tensor, z: torch.Tensor, bp_weight: torch.Tensor, bp_bias: Optional[torch.Tensor],
             proj_weight: torch.Tensor, activation: str, out_activation: str) -> torch.Tensor:
    check_context_linear(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation,
                         "pf_kernels_triton.context_linear")
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if out.numel() == 0:
        return out
    B, H = p.shape[0], p.shape[-1]
    Dz, Dc = z.shape[1], bp_weight.shape[0]
    p3, (S0, S1, S2), (s0, s1, s2) = positions(p)
    P = S0 * S1 * S2
    scratch = torch.empty((B, Dc), dtype=p.dtype, device=p.device)

    def grid(meta):
        rows = cdiv(B, meta["BM"])
        return (rows, smax(1, smin(cdiv(P, meta["BP"]), cdiv(PROGRAMS_TARGET, rows))))

    launch(context_forward_fp32 if p.dtype == torch.float32 else context_forward, grid,
           p3, z, bp_weight, bp_bias if bp_bias is not None else bp_weight.new_empty((0,)), proj_weight,
           scratch, out, B, Dz, Dc, H, P, S1, S2, p3.stride(0), s0, s1, s2, p3.stride(-1),
           z.stride(0), z.stride(1), bp_weight.stride(0), bp_weight.stride(1),
           bp_bias.stride(0) if bp_bias is not None else 0, proj_weight.stride(0), proj_weight.stride(1),
           size_class(B, P, H, Dc), HAS_BIAS=bp_bias is not None, ACT=act_code(activation),
           OUT_ACT=act_code(out_activation), PREC=dot_precision(p.dtype))
    return out


def _forward_fake(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation):
    return p.new_empty(p.shape)


def _grad_context(grad_out: torch.Tensor, saved: Optional[torch.Tensor], term: torch.Tensor,
                  grad_p: torch.Tensor, out_activation: str) -> torch.Tensor:
    """grad_p (written unless out_activation is none) and the position sum of grad_pre, (B, H) fp32."""
    B, H = grad_out.shape[0], grad_out.shape[-1]
    g_ctx = torch.empty((B, H), dtype=torch.float32, device=grad_out.device)
    if B == 0 or H == 0:
        return g_ctx
    g3, (S0, S1, S2), (g0, g1, g2) = positions(grad_out)
    P = S0 * S1 * S2
    if saved is None:  # never read (out_activation none)
        s3, T1, T2, (t0, t1, t2) = g3, S1, S2, (g0, g1, g2)
    else:
        s3, (_, T1, T2), (t0, t1, t2) = positions(saved)
    n_chunks, chunk = chunks(B, P, H)
    target = g_ctx if n_chunks == 1 else torch.empty((B, n_chunks, H), dtype=torch.float32,
                                                     device=grad_out.device)

    def grid(meta):
        return (B * n_chunks * cdiv(H, meta["BLOCK_H"]),)

    launch(context_reduce, grid, g3, s3, term, grad_p, target, P, chunk, n_chunks, S1, S2, T1, T2, H,
           g3.stride(0), g0, g1, g2, g3.stride(-1), s3.stride(0), t0, t1, t2, s3.stride(-1),
           size_class(B, P, H), OUT_ACT=act_code(out_activation))
    if n_chunks > 1:  # the chunks' sums in order
        backproj_reduce_stage(target, g_ctx.new_empty((0,)), g_ctx, 0, H, 1, n_chunks, 0, True)
    return g_ctx


def _backward(grad_out: torch.Tensor, out: Optional[torch.Tensor], p: Optional[torch.Tensor],
              z: torch.Tensor, bp_weight: torch.Tensor, bp_bias: Optional[torch.Tensor],
              proj_weight: torch.Tensor, activation: str, out_activation: str) -> List[torch.Tensor]:
    """[grad_p (empty without an output activation: it is grad_out), grad_z, grad_bp_weight,
    grad_bp_bias (empty without a bias), grad_proj_weight]. out is read for relu, p for the other
    output activations."""
    dtype, device = z.dtype, z.device
    act_id = act_code(out_activation)
    saved = None if act_id == 0 else (out if act_id == 1 else p)
    if saved is None and act_id != 0:
        raise RuntimeError(f"context_linear_backward: out_activation {out_activation!r} needs "
                           f"{'out' if act_id == 1 else 'p'}")
    grad_p = torch.empty(grad_out.shape if act_id != 0 else (0,), dtype=dtype, device=device)
    c = mm(z, bp_weight.t(), dtype, bp_bias, activation)
    # pre = p + term only where out_act' needs it (not for none, nor relu: read from the output)
    term = mm(c, proj_weight.t(), torch.float32) if act_id > 1 else grad_p.new_empty((0,), dtype=torch.float32)
    g_ctx = _grad_context(grad_out, saved, term, grad_p, out_activation)
    # (an fp32 sum over positions, as the reference's: beyond fp16's range where there are many;
    # mm's fp16 dots scale it into range)
    grad_proj_weight = mm(g_ctx.t(), c, dtype)
    grad_c = mm(g_ctx, proj_weight, torch.float32)
    # grad_c is the gradient of a context broadcast over one position: backproj_concat's backward
    grad_z, grad_bp_weight, grad_bp_bias = backproj_backward(grad_c.unsqueeze(1), z, bp_weight, bp_bias,
                                                             activation, 0)
    if bp_bias is None:
        grad_bp_bias = grad_bp_bias.new_empty((0,))
    return [grad_p, grad_z, grad_bp_weight, grad_bp_bias, grad_proj_weight]


def _backward_fake(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, activation, out_activation):
    return [grad_out.new_empty(grad_out.shape if out_activation != "none" else (0,)), z.new_empty(z.shape),
            z.new_empty(bp_weight.shape), z.new_empty(bp_bias.shape if bp_bias is not None else (0,)),
            z.new_empty(proj_weight.shape)]


context_linear_op = define_op("context_linear", _forward, _forward_fake, [context_forward, context_forward_fp32])
context_linear_backward_op = define_op("context_linear_backward", _backward, _backward_fake,
                                       [mm_tuned, mm_tuned_fp32, context_reduce, backproj_reduce])


def _setup_context(ctx, inputs, output):
    p, z, bp_weight, bp_bias, proj_weight, activation, out_activation = inputs
    # what out_act' needs: the output for relu (as torch's relu), p for the others, nothing for none
    ctx.save_for_backward(output if out_activation == "relu" else None,
                          *savable(p if out_activation not in ("none", "relu") else None,
                                   z, bp_weight, bp_bias, proj_weight))
    ctx.activation, ctx.out_activation = activation, out_activation


def _autograd_backward(ctx, grad_out):
    out, p, z, bp_weight, bp_bias, proj_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    no_out_act = ctx.out_activation == "none"
    grads = [None] * 5
    if (any(need[1:5]) or (need[0] and not no_out_act)) and differentiated():
        with without_autocast(z):
            p, z, bp_weight, bp_bias, proj_weight = fresh(p, z, bp_weight, bp_bias, proj_weight)
            y, grad_y, grad_p = context_linear_parts(grad_out, out, p, z, bp_weight, bp_bias, proj_weight,
                                                     ctx.activation, ctx.out_activation)
            grads = gradients([y], [grad_y], [p, z, bp_weight, bp_bias, proj_weight])
            grads[0] = grad_p if p is None else grads[0]
    elif any(need[1:5]) or (need[0] and not no_out_act):
        grads = context_linear_backward_op(grad_out, out, p, z, bp_weight, bp_bias, proj_weight,
                                           ctx.activation, ctx.out_activation)
    grad_p = grad_out if no_out_act else grads[0]  # no copy without an output activation
    return (grad_p if need[0] else None, grads[1] if need[1] else None, grads[2] if need[2] else None,
            grads[3] if bp_bias is not None and need[3] else None, grads[4] if need[4] else None, None, None)


context_linear_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def context_linear(p: torch.Tensor, z: torch.Tensor, bp_weight: torch.Tensor, bp_bias: Optional[torch.Tensor],
                   proj_weight: torch.Tensor, activation: str = "relu", out_activation: str = "none") -> torch.Tensor:
    return context_linear_op(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation)
