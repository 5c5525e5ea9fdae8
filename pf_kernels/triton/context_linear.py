"""context_linear in Triton: out = out_act(p + act(z @ W_bp.T + b) @ W_c.T over every position).

Forward: the (B, H) term in two launches of the shared strided matmul (_matmul.mm): the context
c = act(z @ W_bp.T + b) rounded to p's dtype (as backproj_concat returns it), then term = c @ W_c.T
in fp32. Both GEMMs are tiny (B x Dz x Dc, B x Dc x H); one fused kernel for them would save a
launch but duplicate the matmul, its configs and its AOT checks. The work that scales with the
positions is one streaming pass over p (context_add_kernel): out = out_act(p + term[b]), fp32 in
registers, rounded once.

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

from ._activations import act, act_grad
from ._common import act_code, autotune, cdiv, define_op, launch, positions, size_class
from ._matmul import mm, mm_tuned, mm_tuned_fp32
from .backproj_concat import (_backward as backproj_backward, _reduce as backproj_reduce_stage,
                              backproj_reduce, chunks, position_offsets)

ADD_CONFIGS = [  # a streaming elementwise pass: 8 elements per thread
    dict(BLOCK_R=16, BLOCK_H=64, num_warps=4),
    dict(BLOCK_R=64, BLOCK_H=32, num_warps=8),
]
REDUCE_CONFIGS = [  # 8 elements per thread: act' of gelu with two int64 address tiles (g and the
    # saved tensor) spilled at 16 (sm_90, 4 warps)
    dict(BLOCK_P=16, BLOCK_H=64, num_warps=4),
    dict(BLOCK_P=32, BLOCK_H=64, num_warps=8),
]


@triton.jit(do_not_specialize=["R", "H", "SIZE_CLASS"], do_not_specialize_on_alignment=["P"])
def context_add_kernel(p_ptr, term_ptr, out_ptr, R, P, S1, S2, H, spb, sp0, sp1, sp2, sph, SIZE_CLASS,
                       OUT_ACT: tl.constexpr, ROWS64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # rows r = b * P + position of out (contiguous, H wide), BLOCK_R per program; row numbers in
    # int32 (cheaper division) unless there are 2^31 rows or more (ROWS64)
    if ROWS64:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    b = rows // P
    p_rows = p_ptr + b.to(tl.int64) * spb + position_offsets((rows - b * P).to(tl.int32), S1, S2,
                                                             sp0, sp1, sp2)
    term_rows = term_ptr + b.to(tl.int64) * H
    out_rows = out_ptr + rows.to(tl.int64) * H
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        m = mask_r[:, None] & (offs_h < H)[None, :]
        v = tl.load(p_rows[:, None] + offs_h.to(tl.int64)[None, :] * sph, mask=m, other=0.0).to(tl.float32)
        v += tl.load(term_rows[:, None] + offs_h[None, :], mask=m, other=0.0)
        tl.store(out_rows[:, None] + offs_h[None, :], act(v, OUT_ACT).to(out_ptr.dtype.element_ty), mask=m)


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
    p_end = tl.minimum(p_start + CH, P)
    gsum = tl.zeros([BLOCK_P, BLOCK_H], tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = (offs_p < p_end)[:, None] & mask_h[None, :]
        g = tl.load(g_row[None, :] + position_offsets(offs_p, S1, S2, sg0, sg1, sg2)[:, None],
                    mask=m, other=0.0).to(tl.float32)
        if OUT_ACT != 0:
            saved = tl.load(s_row[None, :] + position_offsets(offs_p, T1, T2, ss0, ss1, ss2)[:, None],
                            mask=m, other=0.0).to(tl.float32)
            if OUT_ACT == 1:
                g = tl.where(saved > 0, g, 0.0)  # relu' from the output, as torch's relu backward
            else:
                g = g * act_grad(saved + term[None, :], OUT_ACT)
            tl.store(gp_row[None, :] + offs_p.to(tl.int64)[:, None] * H, g.to(gp_ptr.dtype.element_ty), mask=m)
        gsum += g
    tl.store(sum_ptr + (b * NCH + s) * H + offs_h, tl.sum(gsum, axis=0), mask=mask_h)


context_add = autotune("context_add", context_add_kernel, ADD_CONFIGS, key=["SIZE_CLASS"])
context_reduce = autotune("context_reduce", context_reduce_kernel, REDUCE_CONFIGS, key=["SIZE_CLASS"])


def _term(z: torch.Tensor, bp_weight: torch.Tensor, bp_bias: Optional[torch.Tensor],
          proj_weight: torch.Tensor, activation: str, dtype: torch.dtype):
    """(c, term): the context act(z @ W_bp.T + b) in dtype (as the reference rounds it) and
    c @ W_c.T (B, H) in fp32."""
    c = mm(z, bp_weight.t(), dtype, bp_bias, activation)
    return c, mm(c, proj_weight.t(), torch.float32)


def _forward(p: torch.Tensor, z: torch.Tensor, bp_weight: torch.Tensor, bp_bias: Optional[torch.Tensor],
             proj_weight: torch.Tensor, activation: str, out_activation: str) -> torch.Tensor:
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if out.numel() == 0:
        return out
    _, term = _term(z, bp_weight, bp_bias, proj_weight, activation, p.dtype)
    B, H = p.shape[0], p.shape[-1]
    p3, (S0, S1, S2), (s0, s1, s2) = positions(p)
    P = S0 * S1 * S2
    R = B * P

    def grid(meta):
        return (cdiv(R, meta["BLOCK_R"]),)

    launch(context_add, grid, p3, term, out, R, P, S1, S2, H, p3.stride(0), s0, s1, s2, p3.stride(-1),
           size_class(B, P, H), OUT_ACT=act_code(out_activation), ROWS64=R >= 2 ** 31 - 1024)
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


context_linear_op = define_op("context_linear", _forward, _forward_fake, [mm_tuned, mm_tuned_fp32, context_add])
context_linear_backward_op = define_op("context_linear_backward", _backward, _backward_fake,
                                       [mm_tuned, mm_tuned_fp32, context_reduce, backproj_reduce])


def _setup_context(ctx, inputs, output):
    p, z, bp_weight, bp_bias, proj_weight, activation, out_activation = inputs
    # what out_act' needs: the output for relu (as torch's relu), p for the others, nothing for none
    ctx.save_for_backward(output if out_activation == "relu" else None,
                          p if out_activation not in ("none", "relu") else None,
                          z, bp_weight, bp_bias, proj_weight)
    ctx.activation, ctx.out_activation = activation, out_activation


def _autograd_backward(ctx, grad_out):
    out, p, z, bp_weight, bp_bias, proj_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    no_out_act = ctx.out_activation == "none"
    grads = [None] * 5
    if any(need[1:5]) or (need[0] and not no_out_act):
        grads = context_linear_backward_op(grad_out, out, p, z, bp_weight, bp_bias, proj_weight,
                                           ctx.activation, ctx.out_activation)
    grad_p = grad_out if no_out_act else grads[0]  # no copy without an output activation
    return (grad_p if need[0] else None, grads[1] if need[1] else None, grads[2] if need[2] else None,
            grads[3] if bp_bias is not None and need[3] else None, grads[4] if need[4] else None, None, None)


context_linear_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def context_linear(p: torch.Tensor, z: torch.Tensor, bp_weight: torch.Tensor, bp_bias: Optional[torch.Tensor],
                   proj_weight: torch.Tensor, activation: str = "relu", out_activation: str = "none") -> torch.Tensor:
    return context_linear_op(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation)
