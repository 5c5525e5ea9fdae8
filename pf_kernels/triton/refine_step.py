"""refine_step in Triton: the fusion head, then every modality's back-projection and concat, in one
launch.

Program (batch-row block, split s) computes its rows of z = act_h(sum_j h_j @ W_h[:, cols_j].T + b_h)
in registers (all of Dz at once), rounds z to the input dtype as the op returns it and stores it;
then, reading those rows back in BK-wide chunks, for every modality j it computes
ctx_j = act(z @ W_j.T + b_j) block by block (tl.dot) and writes it with x_j into x~_j for its share
of the positions (split s takes every nsplit-th position block, so small batches still fill the GPU;
each split recomputes its rows of z, which is cheap next to the copies).
Outside the single-launch limits (Dz > MAX_DZ, more than MAX_K head inputs or MAX_MODALITIES
modalities) the step is composed from fusion_head and backproj_concat. The backward composes the
other ops' backward kernels.
"""
import functools
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._activations import act
from ._common import (PROGRAMS_TARGET, act_code, autotune, cdiv, define_op, dot_precision, launch, pointer_slots,
                      positions, savable, scalar_slots, size_class, smax, smin)
from ._differentiated import (context_of, differentiated, fresh, gradients, head_of, split, sum_over_positions, wide,
                               without_autocast)
from ._matmul import dot
from .backproj_concat import backproj_concat_backward_op, backproj_concat_op, position_offsets
from .fusion_head import (MAX_K, fusion_head_backward_op, fusion_head_op, head_tile, needs_grad, unsaved_pre,
                          unit_feature_strides)

MAX_DZ = 128  # the head's [BM, Dz] fp32 accumulator lives in registers
MAX_MODALITIES = 4

STEP_CONFIGS = [  # the 3-D copy tiles [BM, BP, BD|BC] hold at most 8 elements per thread
    dict(BM=16, BK=32, BC=32, BP=2, BD=32, num_warps=8, num_stages=2),
    dict(BM=16, BK=32, BC=32, BP=4, BD=32, num_warps=8, num_stages=2),
]
STEP_CONFIGS_FP32 = [  # fp32 (FMA) dots hold their whole K slice in registers per thread; BP=4 on 8
    # warps spilled 4 B at ptxas' 128-register cap (sm_90, triton 3.8)
    dict(BM=16, BK=16, BC=32, BP=2, BD=32, num_warps=8, num_stages=2),
    dict(BM=16, BK=16, BC=32, BP=2, BD=32, num_warps=4, num_stages=2),
]


@triton.jit
def pick4(J: tl.constexpr, a0, a1, a2, a3):
    if J == 0:
        r = a0
    elif J == 1:
        r = a1
    elif J == 2:
        r = a2
    else:
        r = a3
    return r


@triton.jit
def store_z_rows(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                 sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                 hw_ptr, hb_ptr, z_ptr, pre_ptr, Dz, shn, shk, shb, offs_m, mask_m, split,
                 K: tl.constexpr, H_UNIT: tl.constexpr, HAS_HEAD_BIAS: tl.constexpr, HEAD_ACT: tl.constexpr,
                 SAVE_PRE: tl.constexpr, PREC: tl.constexpr, BZ: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr):
    """Rows offs_m of z = act_h(sum_j h_j @ W_h[:, cols_j].T + b_h), computed in registers (all of Dz
    at once) and stored as the op returns them (contiguous, the input dtype), with the fp32
    pre-activation (split 0) where SAVE_PRE. Every split of a row block stores the same values;
    after the barrier each reads them back in chunks (a whole [BM, Dz] dot operand would not fit the
    registers of fp32 FMA dots)."""
    offs_z = tl.arange(0, BZ)
    mask_z = offs_z < Dz
    acc = head_tile(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                    sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                    hw_ptr, shn, shk, offs_m, mask_m, offs_z, mask_z, K, H_UNIT, PREC, BM, BZ, BK)
    if HAS_HEAD_BIAS:
        acc += tl.load(hb_ptr + offs_z * shb, mask=mask_z, other=0.0).to(tl.float32)[None, :]
    zq = act(acc, HEAD_ACT).to(z_ptr.dtype.element_ty)
    mask_mz = mask_m[:, None] & mask_z[None, :]
    tl.store(z_ptr + offs_m[:, None] * Dz + offs_z[None, :], zq, mask=mask_mz)
    if SAVE_PRE:
        if split == 0:
            tl.store(pre_ptr + offs_m[:, None] * Dz + offs_z[None, :], acc, mask=mask_mz)
    tl.debug_barrier()  # this program's z stores are visible to all its threads


@triton.jit(do_not_specialize=["M", "Dz", "SIZE_CLASS", *(f"{n}{j}" for n in "D" for j in range(MAX_K)),
                               *(f"{n}{j}" for n in "PXC" for j in range(MAX_MODALITIES))])
def refine_step_kernel(
        h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
        sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
        hw_ptr, hb_ptr, z_ptr, pre_ptr, M, Dz, shn, shk, shb,
        x0, x1, x2, x3, o0, o1, o2, o3, w0, w1, w2, w3, b0, b1, b2, b3,
        P0, P1, P2, P3, R0, R1, R2, R3, T0, T1, T2, T3,  # positions, their S1 and S2
        X0, X1, X2, X3, C0, C1, C2, C3,  # Dx_j, Dc_j
        sxb0, sxb1, sxb2, sxb3, sxa0, sxa1, sxa2, sxa3, sxe0, sxe1, sxe2, sxe3,
        sxf0, sxf1, sxf2, sxf3, sxd0, sxd1, sxd2, sxd3,
        swc0, swc1, swc2, swc3, swk0, swk1, swk2, swk3, sb0, sb1, sb2, sb3, SIZE_CLASS,
        K: tl.constexpr, H_UNIT: tl.constexpr, NMOD: tl.constexpr, HAS_HEAD_BIAS: tl.constexpr, BIAS_MASK: tl.constexpr,
        HEAD_ACT: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr, PREC: tl.constexpr,
        BZ: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
        BD: tl.constexpr):
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    mask_m = offs_m < M
    store_z_rows(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                 sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                 hw_ptr, hb_ptr, z_ptr, pre_ptr, Dz, shn, shk, shb, offs_m, mask_m, split,
                 K, H_UNIT, HAS_HEAD_BIAS, HEAD_ACT, SAVE_PRE, PREC, BZ, BM, BK)
    for j in tl.static_range(NMOD):
        xp = pick4(j, x0, x1, x2, x3)
        op = pick4(j, o0, o1, o2, o3)
        wp = pick4(j, w0, w1, w2, w3)
        bp = pick4(j, b0, b1, b2, b3)
        P = pick4(j, P0, P1, P2, P3)
        S1 = pick4(j, R0, R1, R2, R3)
        S2 = pick4(j, T0, T1, T2, T3)
        Dx = pick4(j, X0, X1, X2, X3)
        Dc = pick4(j, C0, C1, C2, C3)
        sxb = pick4(j, sxb0, sxb1, sxb2, sxb3)
        sxa = pick4(j, sxa0, sxa1, sxa2, sxa3)
        sxe = pick4(j, sxe0, sxe1, sxe2, sxe3)
        sxf = pick4(j, sxf0, sxf1, sxf2, sxf3)
        sxd = pick4(j, sxd0, sxd1, sxd2, sxd3)
        swc = pick4(j, swc0, swc1, swc2, swc3)
        swk = pick4(j, swk0, swk1, swk2, swk3)
        sb = pick4(j, sb0, sb1, sb2, sb3)
        Dout = Dx + Dc
        # x_j's features into x~_j, for this split's position blocks.
        for p0 in range(split * BP, P, nsplit * BP):
            offs_p = p0 + tl.arange(0, BP)
            mask_bp = mask_m[:, None, None] & (offs_p < P)[None, :, None]
            src = xp + offs_m[:, None, None] * sxb + position_offsets(offs_p, S1, S2, sxa, sxe, sxf)[None, :, None]
            dst = op + (offs_m[:, None, None] * P + offs_p[None, :, None]) * Dout
            for d0 in range(0, Dx, BD):
                offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)  # feature strides may be large
                mask = mask_bp & (offs_d < Dx)[None, None, :]
                v = tl.load(src + offs_d[None, None, :] * sxd, mask=mask)
                tl.store(dst + offs_d[None, None, :], v, mask=mask)
        # the context, block by block of Dc, broadcast over this split's positions.
        for c0 in range(0, Dc, BC):
            offs_c = (c0 + tl.arange(0, BC)).to(tl.int64)
            mask_c = offs_c < Dc
            ctx = tl.zeros([BM, BC], tl.float32)
            for k0 in range(0, Dz, BK):
                offs_k = k0 + tl.arange(0, BK)
                mask_k = offs_k < Dz
                zc = tl.load(z_ptr + offs_m[:, None] * Dz + offs_k[None, :],
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                wt = tl.load(wp + offs_c[None, :] * swc + offs_k.to(tl.int64)[:, None] * swk,
                             mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                ctx = dot(zc, wt, ctx, PREC)
            if (BIAS_MASK >> j) & 1:
                ctx += tl.load(bp + offs_c * sb, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            ctx = act(ctx, ACT).to(op.dtype.element_ty)
            for p0 in range(split * BP, P, nsplit * BP):
                offs_p = p0 + tl.arange(0, BP)
                mask = (mask_m[:, None, None] & (offs_p < P)[None, :, None]) & mask_c[None, None, :]
                dst = op + (offs_m[:, None, None] * P + offs_p[None, :, None]) * Dout + Dx
                tl.store(dst + offs_c[None, None, :], tl.broadcast_to(ctx[:, None, :], [BM, BP, BC]),
                         mask=mask)


refine_step_tuned = autotune("refine_step", refine_step_kernel, STEP_CONFIGS, key=["SIZE_CLASS"])
refine_step_tuned_fp32 = autotune("refine_step_fp32", refine_step_kernel, STEP_CONFIGS_FP32,
                                  key=["SIZE_CLASS"])


def fits_one_launch(hs, head_weight, xs) -> bool:
    # The head's row offsets (< Dz) times its weight's row stride are int32 in store_z_rows (int64
    # ones spill); a weight past that (a strided view) takes the composed path, whose are int64.
    dz = head_weight.shape[0]
    return dz <= MAX_DZ and len(hs) <= MAX_K and len(xs) <= MAX_MODALITIES \
        and (dz - 1) * head_weight.stride(0) < 2**31


def _biases(present, bias_mask: int, n: int) -> List[Optional[torch.Tensor]]:
    it = iter(present)
    return [next(it) if (bias_mask >> j) & 1 else None for j in range(n)]


def _forward(hs: List[torch.Tensor], head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
             xs: List[torch.Tensor], bp_weights: List[torch.Tensor], bp_biases: List[torch.Tensor],
             bias_mask: int, head_activation: str, backproj_activation: str,
             save_pre: bool) -> List[torch.Tensor]:
    """[z, pre (fp32, or empty when not saved), x~_1..x~_K]. bp_biases holds the biases present,
    bias_mask says which modalities have one (autograd of custom ops takes Tensor[], not Tensor?[])."""
    bp_biases = _biases(bp_biases, bias_mask, len(xs))
    M, Dz = hs[0].shape[0], head_weight.shape[0]
    dev, dtype = hs[0].device, hs[0].dtype
    keep = save_pre and head_activation != "none"
    z = torch.empty((M, Dz), dtype=dtype, device=dev)
    pre = torch.empty((M, Dz) if keep else (0,), dtype=torch.float32, device=dev)
    outs = [torch.empty((*x.shape[:-1], x.shape[-1] + w.shape[0]), dtype=dtype, device=dev)
            for x, w in zip(xs, bp_weights)]
    if M == 0:
        return [z, pre, *outs]
    n = len(xs)
    views = [positions(x) for x in xs]
    x3 = [v[0] for v in views]
    sizes = [v[1] for v in views]
    strides = [v[2] for v in views]
    dims = [h.shape[1] for h in hs]
    bias_mask = sum(1 << j for j, b in enumerate(bp_biases) if b is not None)

    def grid(meta):
        rows = cdiv(M, meta["BM"])
        blocks = functools.reduce(smax, [cdiv(s[0] * s[1] * s[2], meta["BP"]) for s in sizes])
        # enough programs to fill a large GPU, never more than position blocks
        return (rows, smax(1, smin(blocks, cdiv(PROGRAMS_TARGET, rows))))

    launch(refine_step_tuned_fp32 if dtype == torch.float32 else refine_step_tuned, grid,
           *pointer_slots(hs, MAX_K, hs[0]), *scalar_slots(dims, MAX_K, 0),
           *scalar_slots([h.stride(0) for h in hs], MAX_K, 0),
           *scalar_slots([h.stride(1) for h in hs], MAX_K, 0),
           head_weight, head_bias if head_bias is not None else head_weight.new_empty((0,)), z,
           pre if keep else pre.new_empty((0,)), M, Dz, head_weight.stride(0), head_weight.stride(1),
           head_bias.stride(0) if head_bias is not None else 0,
           *pointer_slots(x3, MAX_MODALITIES, x3[0]), *pointer_slots(outs, MAX_MODALITIES, outs[0]),
           *pointer_slots(bp_weights, MAX_MODALITIES, bp_weights[0]),
           *pointer_slots([b if b is not None else w.new_empty((0,)) for b, w in zip(bp_biases, bp_weights)],
                          MAX_MODALITIES, bp_weights[0]),
           *scalar_slots([s[0] * s[1] * s[2] for s in sizes], MAX_MODALITIES, 0),
           *scalar_slots([s[1] for s in sizes], MAX_MODALITIES, 1),
           *scalar_slots([s[2] for s in sizes], MAX_MODALITIES, 1),
           *scalar_slots([x.shape[-1] for x in xs], MAX_MODALITIES, 0),
           *scalar_slots([w.shape[0] for w in bp_weights], MAX_MODALITIES, 0),
           *scalar_slots([x.stride(0) for x in x3], MAX_MODALITIES, 0),
           *scalar_slots([s[0] for s in strides], MAX_MODALITIES, 0),
           *scalar_slots([s[1] for s in strides], MAX_MODALITIES, 0),
           *scalar_slots([s[2] for s in strides], MAX_MODALITIES, 0),
           *scalar_slots([x.stride(-1) for x in x3], MAX_MODALITIES, 0),
           *scalar_slots([w.stride(0) for w in bp_weights], MAX_MODALITIES, 0),
           *scalar_slots([w.stride(1) for w in bp_weights], MAX_MODALITIES, 0),
           *scalar_slots([b.stride(0) if b is not None else 0 for b in bp_biases], MAX_MODALITIES, 0),
           size_class(M, Dz, sum(dims), functools.reduce(smax, [s[0] * s[1] * s[2] for s in sizes])),
           K=len(hs), H_UNIT=unit_feature_strides(hs), NMOD=n, HAS_HEAD_BIAS=head_bias is not None, BIAS_MASK=bias_mask,
           HEAD_ACT=act_code(head_activation), ACT=act_code(backproj_activation), SAVE_PRE=keep,
           PREC=dot_precision(dtype), BZ=max(16, triton.next_power_of_2(Dz)))
    return [z, pre, *outs]


def _forward_fake(hs, head_weight, head_bias, xs, bp_weights, bp_biases, bias_mask, head_activation,
                  backproj_activation, save_pre):
    M, Dz = hs[0].shape[0], head_weight.shape[0]
    keep = save_pre and head_activation != "none"
    return [hs[0].new_empty((M, Dz)), hs[0].new_empty((M, Dz) if keep else (0,), dtype=torch.float32),
            *[x.new_empty((*x.shape[:-1], x.shape[-1] + w.shape[0])) for x, w in zip(xs, bp_weights)]]


refine_step_op = define_op("refine_step", _forward, _forward_fake, [refine_step_tuned, refine_step_tuned_fp32])


def _setup_context(ctx, inputs, output):
    hs, hw, hb, xs, ws, bs, bias_mask, head_act, bp_act, save_pre = inputs
    ctx.k, ctx.n = len(hs), len(xs)
    ctx.has_head_bias = hb is not None
    ctx.bp_has_bias = [b is not None for b in _biases(bs, bias_mask, len(xs))]
    ctx.acts = (head_act, bp_act)
    ctx.pre_saved = save_pre or head_act == "none"
    ctx.x_features = [x.shape[-1] for x in xs]
    ctx.save_for_backward(*savable(*hs, hw, hb), output[0], output[1], *savable(*ws, *bs))


def _autograd_backward(ctx, grads):
    if not ctx.pre_saved:
        raise unsaved_pre("refine_step")
    saved = ctx.saved_tensors
    k, n = ctx.k, ctx.n
    hs, hw, hb, z, pre = list(saved[:k]), saved[k], saved[k + 1], saved[k + 2], saved[k + 3]
    ws = list(saved[k + 4:k + 4 + n])
    rest = iter(saved[k + 4 + n:])
    bs = [next(rest) if has else None for has in ctx.bp_has_bias]
    head_act, bp_act = ctx.acts
    if differentiated():
        with without_autocast(hw):
            hw, hb, *rest = fresh(hw, hb, *ws, *bs)
            ws, bs = rest[:n], rest[n:]
            joined, z = head_of(hs, hw, hb, head_act)
            outputs, grad_outputs = [z], [wide(grads[0])]
            for g, x_features, w, b in zip(grads[2:], ctx.x_features, ws, bs):
                outputs.append(context_of(z, w, b, bp_act))
                grad_outputs.append(sum_over_positions(wide(g[..., x_features:])))
            present = [b for b in bs if b is not None]
            got = gradients(outputs, grad_outputs, [joined, hw, hb, *ws, *present])
            return (split(got[0], hs), got[1], got[2], [g[..., :f] for g, f in zip(grads[2:], ctx.x_features)],
                    got[3:3 + n], got[3 + n:], None, None, None, None)
    grad_z = grads[0].float()  # accumulate z's gradient in fp32 over its uses
    grad_xs, grad_ws, grad_bs = [], [], []
    for g, x_features, w, b in zip(grads[2:], ctx.x_features, ws, bs):
        grad_xs.append(g[..., :x_features])  # a view: no copy
        gz, gw, gb = backproj_concat_backward_op(g, z, w, b, bp_act, x_features)
        grad_z = grad_z + gz.float()
        grad_ws.append(gw)
        if b is not None:
            grad_bs.append(gb)
    head = fusion_head_backward_op(grad_z, hs, hw, pre, ctx.has_head_bias, head_act)
    return (list(head[:k]), head[k], head[k + 1] if ctx.has_head_bias else None,
            grad_xs, grad_ws, grad_bs, None, None, None, None)


refine_step_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def refine_step(hs: List[torch.Tensor], head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                xs: List[torch.Tensor], bp_weights: List[torch.Tensor],
                bp_biases: List[Optional[torch.Tensor]], head_activation: str = "relu",
                backproj_activation: str = "relu"):
    hs, xs, bp_weights, bp_biases = list(hs), list(xs), list(bp_weights), list(bp_biases)
    save = needs_grad(*hs, head_weight, head_bias, *xs, *bp_weights, *bp_biases)
    if not fits_one_launch(hs, head_weight, xs):
        z = fusion_head_op(hs, head_weight, head_bias, head_activation, save)[0]
        return z, [backproj_concat_op(x, z, w, b, backproj_activation)
                   for x, w, b in zip(xs, bp_weights, bp_biases)]
    present = [b for b in bp_biases if b is not None]
    bias_mask = sum(1 << j for j, b in enumerate(bp_biases) if b is not None)
    out = refine_step_op(hs, head_weight, head_bias, xs, bp_weights, present, bias_mask,
                         head_activation, backproj_activation, save)
    return out[0], list(out[2:])
