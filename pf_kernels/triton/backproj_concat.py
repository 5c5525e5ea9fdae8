"""backproj_concat in Triton: out = cat([x, act(z @ W.T + b) over every position], -1).

Forward: the context act(z @ W.T + b) (B, Dc) once, on tensor cores (the matmul's epilogue adds
the bias and applies act), then one kernel over the flattened (batch, position) rows writes x and
the row's context into out. Backward: grad_x is a view of grad_out; grad_out's context part is
summed over positions in fp32, times act'(pre) (pre = z @ W.T + b in fp32, recomputed on tensor
cores: gelu's derivative needs it, and it is exact in bf16 where the saved output is not), giving
grad_pre (B, Dc). The sum runs in two deterministic stages where a few batch rows have many
positions (chunks of positions in parallel, then the chunks in order), so small batches still fill
the GPU. grad_z and grad_weight are matmuls of grad_pre, grad_bias its column sum.
"""
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._validation import check_backproj_concat
from ._activations import grad_through
from ._common import act_code, autotune, cdiv, define_op, launch, positions, savable, size_class, smax, smin
from ._differentiated import context_of, differentiated, fresh, gradients, sum_over_positions, wide, without_autocast
from ._matmul import mm, mm_tuned, mm_tuned_fp32

FILL_CONFIGS = [  # 8 elements per thread: a copy needs occupancy, not big tiles
    dict(BLOCK_R=16, BLOCK_D=64, BLOCK_C=64, num_warps=4),
    dict(BLOCK_R=64, BLOCK_D=32, BLOCK_C=32, num_warps=8),
]
REDUCE_CONFIGS = [  # 16 fp32 partial sums per thread
    dict(BLOCK_P=32, BLOCK_C=64, num_warps=4),
    dict(BLOCK_P=64, BLOCK_C=64, num_warps=8),
]
# The position sum is split into chunks until about this many programs run (a large GPU's SMs
# several times over), with at least MIN_CHUNK positions each. Independent of the GPU and of the
# config, so the result does not depend on either beyond the config's own summation order.
REDUCE_PROGRAMS = 1024
MIN_CHUNK = 256


@triton.jit
def position_offsets(p, S1, S2, s0, s1, s2):
    """Element offsets (int64) of positions p (int32) in a (S0, S1, S2) grid with strides s*.
    With S1 = S2 = 1 (merged positions; Triton specialises arguments equal to 1) nothing divides."""
    i2 = p % S2
    t = p // S2
    return (t // S1).to(tl.int64) * s0 + (t % S1).to(tl.int64) * s1 + i2.to(tl.int64) * s2


@triton.jit(do_not_specialize=["R", "Dx", "Dc", "SIZE_CLASS"], do_not_specialize_on_alignment=["P"])
def backproj_fill_kernel(x_ptr, ctx_ptr, out_ptr, R, P, S1, S2, Dx, Dc,
                         sxb, sx0, sx1, sx2, sxd, SIZE_CLASS, ROWS64: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    # rows r = b * P + p of out (contiguous, Dx + Dc wide), BLOCK_R per program; row numbers in
    # int32 (cheaper division) unless there are 2^31 rows or more (ROWS64)
    if ROWS64:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    b = rows // P
    x_rows = x_ptr + b.to(tl.int64) * sxb + position_offsets((rows - b * P).to(tl.int32), S1, S2,
                                                             sx0, sx1, sx2)
    out_rows = out_ptr + rows.to(tl.int64) * (Dx + Dc)
    for d0 in range(0, Dx, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_r[:, None] & (offs_d < Dx)[None, :]
        v = tl.load(x_rows[:, None] + offs_d.to(tl.int64)[None, :] * sxd, mask=m)
        tl.store(out_rows[:, None] + offs_d[None, :], v, mask=m)
    ctx_rows = ctx_ptr + b.to(tl.int64) * Dc
    for c0 in range(0, Dc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = mask_r[:, None] & (offs_c < Dc)[None, :]
        v = tl.load(ctx_rows[:, None] + offs_c[None, :], mask=m)
        tl.store(out_rows[:, None] + Dx + offs_c[None, :], v, mask=m)


@triton.jit(do_not_specialize=["CH", "NCH", "Dx", "Dc", "SIZE_CLASS"],
            do_not_specialize_on_alignment=["P"])
def backproj_reduce_kernel(g_ptr, pre_ptr, out_ptr, P, CH, NCH, S1, S2, Dx, Dc,
                           sgb, sg0, sg1, sg2, sgd, SIZE_CLASS,
                           ACT: tl.constexpr, FINISH: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (b, chunk s, column block): the fp32 sum of g[b, positions s*CH .. s*CH+CH-1,
    Dx + columns]. FINISH (one chunk): times act'(pre[b, columns]) into out (B, Dc); else into
    out (B, NCH, Dc) at chunk s."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(Dc, BLOCK_C)
    t = pid // tiles_c
    s = t % NCH
    b = (t // NCH).to(tl.int64)
    offs_c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < Dc
    g_row = g_ptr + b * sgb + (Dx + offs_c).to(tl.int64) * sgd
    p_start = s * CH
    p_end = p_start + tl.minimum(CH, P - p_start)  # (p_start + CH may pass 2^31)
    gsum = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        rows = position_offsets(offs_p, S1, S2, sg0, sg1, sg2)
        gsum += tl.load(g_row[None, :] + rows[:, None],
                        mask=(offs_p < p_end)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    g = tl.sum(gsum, axis=0)
    if FINISH:
        if ACT != 0:
            g = grad_through(g, tl.load(pre_ptr + b * Dc + offs_c, mask=mask_c, other=0.0), ACT)
        tl.store(out_ptr + b * Dc + offs_c, g, mask=mask_c)
    else:
        tl.store(out_ptr + (b * NCH + s) * Dc + offs_c, g, mask=mask_c)


backproj_fill = autotune("backproj_fill", backproj_fill_kernel, FILL_CONFIGS, key=["SIZE_CLASS"])
backproj_reduce = autotune("backproj_reduce", backproj_reduce_kernel, REDUCE_CONFIGS, key=["SIZE_CLASS"])


def launch_forward(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], activation: str, out: torch.Tensor) -> None:
    """Writes backproj_concat(x, z, ...) into out (contiguous, (B, *S, Dx + Dc))."""
    B, Dx, Dc = x.shape[0], x.shape[-1], weight.shape[0]
    if out.numel() == 0:
        return
    ctx = mm(z, weight.t(), x.dtype, bias, activation)  # (B, Dc), rounded as the output
    x3, (S0, S1, S2), (s0, s1, s2) = positions(x)
    P = S0 * S1 * S2
    R = B * P

    def grid(meta):
        return (cdiv(R, meta["BLOCK_R"]),)

    launch(backproj_fill, grid, x3, ctx, out, R, P, S1, S2, Dx, Dc,
           x3.stride(0), s0, s1, s2, x3.stride(-1), size_class(B, P, Dx, Dc), ROWS64=R >= 2 ** 31 - 1024)


def _forward(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str) -> torch.Tensor:
    check_backproj_concat(x, z, weight, bias, activation, "pf_kernels_triton.backproj_concat")
    out = torch.empty((*x.shape[:-1], x.shape[-1] + weight.shape[0]), dtype=x.dtype, device=x.device)
    launch_forward(x, z, weight, bias, activation, out)
    return out


def _forward_fake(x, z, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] + weight.shape[0]))


def chunks(B: int, P: int, Dc: int) -> Tuple[int, int]:
    """(number of chunks, positions per chunk) of the position sum. smin/smax: symbolic
    sizes under torch.compile stay symbolic (no guard, no recompile per batch size)."""
    per_chunk = smax(B * cdiv(Dc, 64), 1)  # programs per chunk, about
    n = smax(1, smin(cdiv(P, MIN_CHUNK), REDUCE_PROGRAMS // per_chunk))
    size = cdiv(P, n)
    return smax(1, cdiv(P, smax(size, 1))), size  # P = 0: one empty chunk


def _reduce(g: torch.Tensor, pre: torch.Tensor, out: torch.Tensor, x_features: int, Dc: int,
            n_chunks: int, chunk: int, act_id: int, finish: bool) -> None:
    """One stage of the position sum of g's context part (see backproj_reduce_kernel)."""
    B = g.shape[0]
    g3, (S0, S1, S2), (s0, s1, s2) = positions(g)
    P = S0 * S1 * S2

    def grid(meta):
        return (B * n_chunks * cdiv(Dc, meta["BLOCK_C"]),)

    launch(backproj_reduce, grid, g3, pre, out, P, chunk, n_chunks, S1, S2, x_features, Dc,
           g3.stride(0), s0, s1, s2, g3.stride(-1), size_class(B, P, Dc),
           ACT=act_id, FINISH=finish)


def grad_pre_of(grad_out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], activation: str, x_features: int) -> torch.Tensor:
    """grad_out's context part summed over positions, times act'(z @ W.T + b): (B, Dc) fp32."""
    B, Dc = z.shape[0], weight.shape[0]
    grad_pre = torch.empty((B, Dc), dtype=torch.float32, device=z.device)
    if B == 0 or Dc == 0:
        return grad_pre
    act_id = act_code(activation)
    pre = mm(z, weight.t(), torch.float32, bias) if act_id != 0 else grad_pre.new_empty((0,))
    P = math.prod(grad_out.shape[1:-1])
    n_chunks, chunk = chunks(B, P, Dc)
    if n_chunks == 1:
        _reduce(grad_out, pre, grad_pre, x_features, Dc, 1, chunk, act_id, True)
    else:
        partial = torch.empty((B, n_chunks, Dc), dtype=torch.float32, device=z.device)
        _reduce(grad_out, pre, partial, x_features, Dc, n_chunks, chunk, act_id, False)
        _reduce(partial, pre, grad_pre, 0, Dc, 1, n_chunks, act_id, True)
    return grad_pre


def _backward(grad_out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], activation: str, x_features: int) -> List[torch.Tensor]:
    """[grad_z, grad_weight, grad_bias (fp32 sum of grad_pre, in the input dtype)]."""
    width = x_features + weight.shape[0]
    if grad_out.dim() < 2 or grad_out.shape[0] != z.shape[0] or grad_out.shape[-1] != width or x_features < 0:
        raise ValueError(f"pf_kernels_triton.backproj_concat_backward: grad_out must be (B, *positions, "
                         f"x_features + Dc) = ({z.shape[0]}, ..., {width}), got {tuple(grad_out.shape)}")
    grad_pre = grad_pre_of(grad_out, z, weight, bias, activation, x_features)
    grad_z = mm(grad_pre, weight, z.dtype)
    grad_weight = mm(grad_pre.t(), z, z.dtype)
    grad_bias = grad_pre.sum(0).to(z.dtype)
    return [grad_z, grad_weight, grad_bias]


def _backward_fake(grad_out, z, weight, bias, activation, x_features):
    B, Dz, Dc = z.shape[0], z.shape[1], weight.shape[0]
    return [z.new_empty((B, Dz)), z.new_empty((Dc, Dz)), z.new_empty((Dc,))]


backproj_concat_op = define_op("backproj_concat", _forward, _forward_fake,
                               [mm_tuned, mm_tuned_fp32, backproj_fill])
backproj_concat_backward_op = define_op("backproj_concat_backward", _backward, _backward_fake,
                                        [mm_tuned, mm_tuned_fp32, backproj_reduce])


def _setup_context(ctx, inputs, output):
    x, z, weight, bias, activation = inputs
    ctx.save_for_backward(*savable(z, weight, bias))
    ctx.activation = activation
    ctx.x_features = x.shape[-1]


def _autograd_backward(ctx, grad_out):
    z, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_out[..., :ctx.x_features] if need[0] else None  # a view: no copy
    grad_z = grad_weight = grad_bias = None
    if (need[1] or need[2] or need[3]) and differentiated():
        with without_autocast(z):
            grad_context = sum_over_positions(wide(grad_out[..., ctx.x_features:]))
            z, weight, bias = fresh(z, weight, bias)
            grad_z, grad_weight, grad_bias = gradients([context_of(z, weight, bias, ctx.activation)], [grad_context],
                                                       [z, weight, bias])
    elif need[1] or need[2] or need[3]:
        grad_z, grad_weight, grad_bias = backproj_concat_backward_op(
            grad_out, z, weight, bias, ctx.activation, ctx.x_features)
    return (grad_x, grad_z if need[1] else None, grad_weight if need[2] else None,
            grad_bias if bias is not None and need[3] else None, None)


backproj_concat_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def backproj_concat(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, activation: str = "relu") -> torch.Tensor:
    return backproj_concat_op(x, z, weight, bias, activation)
