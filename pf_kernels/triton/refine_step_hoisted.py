"""refine_step_hoisted in Triton: the fusion head, then every hoisted modality's context_linear, in
one launch.

Program (batch-row block, split s) computes its rows of z = act_h(sum_j h_j @ W_h[:, cols_j].T + b_h)
in registers, rounds z to the input dtype as the op returns it and stores it (as refine_step's
kernel does); then every modality's context c_j = act(z @ W_bp_j.T + b_j) into its columns of one
(B, sum Dc_j) scratch (context_linear's store_context), and, block by block of H_j, the fp32 term
c_j @ W_c_j.T added to p_j over this split's position blocks (context_linear's add_term). Outside
the one-launch limits (Dz > MAX_DZ, more than MAX_K head inputs or MAX_MODALITIES modalities) the
step is fusion_head then context_linear per modality. The backward composes those ops' backward
kernels.
"""
import functools
from typing import List, Optional, Union

import torch
import triton
import triton.language as tl

from ._activations import CODES
from ._common import (PROGRAMS_TARGET, act_code, autotune, cdiv, define_op, dot_precision, launch, pointer_slots,
                      positions, savable, scalar_slots, size_class, smax, smin)
from ._differentiated import (context_linear_parts, differentiated, fresh, gradients, head_of, split, wide,
                               without_autocast)
from .context_linear import add_term, context_linear_backward_op, context_linear_op, store_context
from .fusion_head import (MAX_K, fusion_head_backward_op, fusion_head_op, needs_grad, unit_feature_strides,
                          unsaved_pre)
from .refine_step import MAX_MODALITIES, _biases, fits_one_launch, pick4, store_z_rows

_NAMES = {code: name for name, code in CODES.items()}

HOISTED_CONFIGS = [  # the [BM, BP, BH] tiles of p hold at most 8 elements per thread; 8 warps of 16-bit
    # dots with BP=4 spilled 12 B on sm_80 (triton 3.9)
    dict(BM=16, BK=32, BC=32, BP=2, BH=32, num_warps=4, num_stages=2),
    dict(BM=16, BK=32, BC=32, BP=2, BH=32, num_warps=8, num_stages=2),
]
HOISTED_CONFIGS_FP32 = [  # fp32 (FMA) dots hold their whole K slice in registers per thread. Spills met
    # at ptxas' 128-register cap: BP=4 on 8 warps (sm_90, triton 3.6), 4 warps in 2 stages with tf32
    # (sm_80, triton 3.9); one stage on 4 warps has none
    dict(BM=16, BK=16, BC=16, BP=2, BH=32, num_warps=4, num_stages=1),
    dict(BM=16, BK=16, BC=16, BP=2, BH=32, num_warps=8, num_stages=2),
]


@triton.jit(do_not_specialize=["M", "Dz", "LDC", "SIZE_CLASS", *(f"D{j}" for j in range(MAX_K)),
                               *(f"{n}{j}" for n in "PCE" for j in range(MAX_MODALITIES))])
def refine_step_hoisted_kernel(
        h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
        sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
        hw_ptr, hb_ptr, z_ptr, pre_ptr, c_ptr, M, Dz, LDC, shn, shk, shb,
        p0, p1, p2, p3, o0, o1, o2, o3, w0, w1, w2, w3, b0, b1, b2, b3, v0, v1, v2, v3,
        P0, P1, P2, P3, R0, R1, R2, R3, T0, T1, T2, T3,  # positions, their S1 and S2
        C0, C1, C2, C3, E0, E1, E2, E3,  # Dc_j, H_j
        spb0, spb1, spb2, spb3, spa0, spa1, spa2, spa3, spe0, spe1, spe2, spe3,
        spf0, spf1, spf2, spf3, sph0, sph1, sph2, sph3,
        swc0, swc1, swc2, swc3, swk0, swk1, swk2, swk3, sb0, sb1, sb2, sb3,
        svh0, svh1, svh2, svh3, svc0, svc1, svc2, svc3, SIZE_CLASS,
        K: tl.constexpr, H_UNIT: tl.constexpr, NMOD: tl.constexpr, HAS_HEAD_BIAS: tl.constexpr,
        BIAS_MASK: tl.constexpr, HEAD_ACT: tl.constexpr, ACT: tl.constexpr, OUT_ACTS: tl.constexpr,
        SAVE_PRE: tl.constexpr, PREC: tl.constexpr, BZ: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        BC: tl.constexpr, BP: tl.constexpr, BH: tl.constexpr):
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    mask_m = offs_m < M
    store_z_rows(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                 sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                 hw_ptr, hb_ptr, z_ptr, pre_ptr, Dz, shn, shk, shb, offs_m, mask_m, split,
                 K, H_UNIT, HAS_HEAD_BIAS, HEAD_ACT, SAVE_PRE, PREC, BZ, BM, BK)
    c_col = 0
    for j in tl.static_range(NMOD):  # every modality's context into its columns of the scratch
        Dc = pick4(j, C0, C1, C2, C3)
        store_context(z_ptr, Dz, 1, Dz, pick4(j, w0, w1, w2, w3), pick4(j, swc0, swc1, swc2, swc3),
                      pick4(j, swk0, swk1, swk2, swk3), pick4(j, b0, b1, b2, b3), pick4(j, sb0, sb1, sb2, sb3),
                      c_ptr + c_col, LDC, Dc, offs_m, mask_m, (BIAS_MASK >> j) & 1, ACT, PREC, BM, BK, BC)
        c_col += Dc
    tl.debug_barrier()  # the contexts too
    c_col = 0
    for j in tl.static_range(NMOD):
        Dc = pick4(j, C0, C1, C2, C3)
        add_term(c_ptr + c_col, LDC, Dc, pick4(j, v0, v1, v2, v3), pick4(j, svh0, svh1, svh2, svh3),
                 pick4(j, svc0, svc1, svc2, svc3), pick4(j, p0, p1, p2, p3), pick4(j, spb0, spb1, spb2, spb3),
                 pick4(j, spa0, spa1, spa2, spa3), pick4(j, spe0, spe1, spe2, spe3),
                 pick4(j, spf0, spf1, spf2, spf3), pick4(j, sph0, sph1, sph2, sph3), pick4(j, P0, P1, P2, P3),
                 pick4(j, R0, R1, R2, R3), pick4(j, T0, T1, T2, T3), pick4(j, E0, E1, E2, E3),
                 pick4(j, o0, o1, o2, o3), offs_m, mask_m, split, nsplit, (OUT_ACTS >> (3 * j)) & 7, PREC,
                 BM, BC, BP, BH)
        c_col += Dc


hoisted_tuned = autotune("refine_step_hoisted", refine_step_hoisted_kernel, HOISTED_CONFIGS, key=["SIZE_CLASS"])
hoisted_tuned_fp32 = autotune("refine_step_hoisted_fp32", refine_step_hoisted_kernel, HOISTED_CONFIGS_FP32,
                              key=["SIZE_CLASS"])


def _out_names(out_codes: int, n: int) -> List[str]:
    return [_NAMES[(out_codes >> (3 * j)) & 7] for j in range(n)]


def _forward(hs: List[torch.Tensor], head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
             ps: List[torch.Tensor], bp_weights: List[torch.Tensor], bp_biases: List[torch.Tensor],
             proj_weights: List[torch.Tensor], bias_mask: int, head_activation: str, backproj_activation: str,
             out_codes: int, save_pre: bool) -> List[torch.Tensor]:
    """[z, pre (fp32, or empty when not saved), out_1..out_K]. bp_biases holds the biases present,
    bias_mask says which modalities have one, out_codes packs the output activations (3 bits each):
    autograd of custom ops takes Tensor[], not Tensor?[], and no str[]."""
    bp_biases = _biases(bp_biases, bias_mask, len(ps))
    M, Dz = hs[0].shape[0], head_weight.shape[0]
    dev, dtype = hs[0].device, hs[0].dtype
    keep = save_pre and head_activation != "none"
    z = torch.empty((M, Dz), dtype=dtype, device=dev)
    pre = torch.empty((M, Dz) if keep else (0,), dtype=torch.float32, device=dev)
    outs = [torch.empty(p.shape, dtype=dtype, device=dev) for p in ps]
    if M == 0:
        return [z, pre, *outs]
    views = [positions(p) for p in ps]
    p3 = [v[0] for v in views]
    sizes = [v[1] for v in views]
    strides = [v[2] for v in views]
    dims = [h.shape[1] for h in hs]
    dcs = [w.shape[0] for w in bp_weights]
    scratch = torch.empty((M, sum(dcs)), dtype=dtype, device=dev)

    def grid(meta):
        rows = cdiv(M, meta["BM"])
        blocks = functools.reduce(smax, [cdiv(s[0] * s[1] * s[2], meta["BP"]) for s in sizes])
        return (rows, smax(1, smin(blocks, cdiv(PROGRAMS_TARGET, rows))))

    n = len(ps)
    launch(hoisted_tuned_fp32 if dtype == torch.float32 else hoisted_tuned, grid,
           *pointer_slots(hs, MAX_K, hs[0]), *scalar_slots(dims, MAX_K, 0),
           *scalar_slots([h.stride(0) for h in hs], MAX_K, 0),
           *scalar_slots([h.stride(1) for h in hs], MAX_K, 0),
           head_weight, head_bias if head_bias is not None else head_weight.new_empty((0,)), z,
           pre if keep else pre.new_empty((0,)), scratch, M, Dz, scratch.shape[1],
           head_weight.stride(0), head_weight.stride(1), head_bias.stride(0) if head_bias is not None else 0,
           *pointer_slots(p3, MAX_MODALITIES, p3[0]), *pointer_slots(outs, MAX_MODALITIES, outs[0]),
           *pointer_slots(bp_weights, MAX_MODALITIES, bp_weights[0]),
           *pointer_slots([b if b is not None else w.new_empty((0,)) for b, w in zip(bp_biases, bp_weights)],
                          MAX_MODALITIES, bp_weights[0]),
           *pointer_slots(proj_weights, MAX_MODALITIES, proj_weights[0]),
           *scalar_slots([s[0] * s[1] * s[2] for s in sizes], MAX_MODALITIES, 0),
           *scalar_slots([s[1] for s in sizes], MAX_MODALITIES, 1),
           *scalar_slots([s[2] for s in sizes], MAX_MODALITIES, 1),
           *scalar_slots(dcs, MAX_MODALITIES, 0), *scalar_slots([p.shape[-1] for p in ps], MAX_MODALITIES, 0),
           *scalar_slots([p.stride(0) for p in p3], MAX_MODALITIES, 0),
           *scalar_slots([s[0] for s in strides], MAX_MODALITIES, 0),
           *scalar_slots([s[1] for s in strides], MAX_MODALITIES, 0),
           *scalar_slots([s[2] for s in strides], MAX_MODALITIES, 0),
           *scalar_slots([p.stride(-1) for p in p3], MAX_MODALITIES, 0),
           *scalar_slots([w.stride(0) for w in bp_weights], MAX_MODALITIES, 0),
           *scalar_slots([w.stride(1) for w in bp_weights], MAX_MODALITIES, 0),
           *scalar_slots([b.stride(0) if b is not None else 0 for b in bp_biases], MAX_MODALITIES, 0),
           *scalar_slots([w.stride(0) for w in proj_weights], MAX_MODALITIES, 0),
           *scalar_slots([w.stride(1) for w in proj_weights], MAX_MODALITIES, 0),
           size_class(M, Dz, sum(dims), functools.reduce(smax, [s[0] * s[1] * s[2] for s in sizes]),
                      max(p.shape[-1] for p in ps)),
           K=len(hs), H_UNIT=unit_feature_strides(hs), NMOD=n, HAS_HEAD_BIAS=head_bias is not None,
           BIAS_MASK=bias_mask, HEAD_ACT=act_code(head_activation), ACT=act_code(backproj_activation),
           OUT_ACTS=out_codes, SAVE_PRE=keep, PREC=dot_precision(dtype), BZ=max(16, triton.next_power_of_2(Dz)))
    return [z, pre, *outs]


def _forward_fake(hs, head_weight, head_bias, ps, bp_weights, bp_biases, proj_weights, bias_mask,
                  head_activation, backproj_activation, out_codes, save_pre):
    M, Dz = hs[0].shape[0], head_weight.shape[0]
    keep = save_pre and head_activation != "none"
    return [hs[0].new_empty((M, Dz)), hs[0].new_empty((M, Dz) if keep else (0,), dtype=torch.float32),
            *[p.new_empty(p.shape) for p in ps]]


refine_step_hoisted_op = define_op("refine_step_hoisted", _forward, _forward_fake, [hoisted_tuned, hoisted_tuned_fp32])


def _setup_context(ctx, inputs, output):
    hs, hw, hb, ps, ws, bs, vs, bias_mask, head_act, bp_act, out_codes, save_pre = inputs
    n = len(ps)
    ctx.k, ctx.n = len(hs), n
    ctx.has_head_bias = hb is not None
    ctx.bp_has_bias = [b is not None for b in _biases(bs, bias_mask, n)]
    ctx.acts = (head_act, bp_act, _out_names(out_codes, n))
    ctx.pre_saved = save_pre or head_act == "none"
    # what each out_act' needs, as context_linear saves it: the output for relu, p for the others
    saved = [output[2 + j] if a == "relu" else (p if a != "none" else None)
             for j, (p, a) in enumerate(zip(ps, ctx.acts[2]))]
    ctx.save_for_backward(*savable(*hs, hw, hb), output[0], output[1], *savable(*saved, *ws, *vs, *bs))


def _autograd_backward(ctx, grads):
    if not ctx.pre_saved:
        raise unsaved_pre("refine_step_hoisted")
    saved = ctx.saved_tensors
    k, n = ctx.k, ctx.n
    hs, hw, hb, z, pre = list(saved[:k]), saved[k], saved[k + 1], saved[k + 2], saved[k + 3]
    rest = list(saved[k + 4:])
    kept, ws, vs = rest[:n], rest[n:2 * n], rest[2 * n:3 * n]
    given = iter(rest[3 * n:])
    bs = [next(given) if has else None for has in ctx.bp_has_bias]
    head_act, bp_act, out_acts = ctx.acts
    if differentiated():
        with without_autocast(hw):
            hw, hb, *rest = fresh(hw, hb, *kept, *ws, *vs, *bs)
            kept, ws, vs, bs = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:]
            joined, z = head_of(hs, hw, hb, head_act)
            outputs, grad_outputs, grad_ps, ps = [z], [wide(grads[0])], [], []
            for g, a, s, w, b, v in zip(grads[2:], out_acts, kept, ws, bs, vs):
                out, p = (s, None) if a == "relu" else (None, s)
                y, grad_y, grad_p = context_linear_parts(g, out, p, z, w, b, v, bp_act, a)
                outputs.append(y)
                grad_outputs.append(grad_y)
                grad_ps.append(grad_p)
                ps.append(p)
            present = [b for b in bs if b is not None]
            got = gradients(outputs, grad_outputs, [joined, hw, hb, *ps, *ws, *vs, *present])
            grad_ps = [direct if p is None else from_y for direct, p, from_y in zip(grad_ps, ps, got[3:3 + n])]
            return (split(got[0], hs), got[1], got[2], grad_ps, got[3 + n:3 + 2 * n], got[3 + 3 * n:],
                    got[3 + 2 * n:3 + 3 * n], None, None, None, None, None)
    grad_z = grads[0].float()  # accumulate z's gradient in fp32 over its uses
    grad_ps, grad_ws, grad_bs, grad_vs = [], [], [], []
    for g, a, s, w, b, v in zip(grads[2:], out_acts, kept, ws, bs, vs):
        out, p = (s, None) if a == "relu" else (None, s)
        gp, gz, gw, gb, gv = context_linear_backward_op(g, out, p, z, w, b, v, bp_act, a)
        grad_ps.append(g if a == "none" else gp)  # no copy without an output activation
        grad_z = grad_z + gz.float()
        grad_ws.append(gw)
        grad_vs.append(gv)
        if b is not None:
            grad_bs.append(gb)
    head = fusion_head_backward_op(grad_z, hs, hw, pre, ctx.has_head_bias, head_act)
    return (list(head[:k]), head[k], head[k + 1] if ctx.has_head_bias else None,
            grad_ps, grad_ws, grad_bs, grad_vs, None, None, None, None, None)


refine_step_hoisted_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def refine_step_hoisted(hs: List[torch.Tensor], head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                        ps: List[torch.Tensor], bp_weights: List[torch.Tensor],
                        bp_biases: List[Optional[torch.Tensor]], proj_weights: List[torch.Tensor],
                        head_activation: str = "relu", backproj_activation: str = "relu",
                        out_activations: Union[str, List[str]] = "none"):
    hs, ps, bp_weights, proj_weights = list(hs), list(ps), list(bp_weights), list(proj_weights)
    out_activations = [out_activations] * len(ps) if isinstance(out_activations, str) else list(out_activations)
    bp_biases = list(bp_biases)
    save = needs_grad(*hs, head_weight, head_bias, *ps, *bp_weights, *bp_biases, *proj_weights)
    if not fits_one_launch(hs, head_weight, ps):
        z = fusion_head_op(hs, head_weight, head_bias, head_activation, save)[0]
        return z, [context_linear_op(p, z, w, b, v, backproj_activation, a)
                   for p, w, b, v, a in zip(ps, bp_weights, bp_biases, proj_weights, out_activations)]
    present = [b for b in bp_biases if b is not None]
    bias_mask = sum(1 << j for j, b in enumerate(bp_biases) if b is not None)
    out_codes = sum(act_code(a) << (3 * j) for j, a in enumerate(out_activations))
    out = refine_step_hoisted_op(hs, head_weight, head_bias, ps, bp_weights, present, proj_weights, bias_mask,
                                 head_activation, backproj_activation, out_codes, save)
    return out[0], list(out[2:])
