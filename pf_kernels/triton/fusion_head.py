"""fusion_head in Triton: act(cat(hs, -1) @ W.T + b) reading each h_j through its own pointer.

Forward: one launch, tiles of (batch rows, Dz), the K inputs unrolled (K a tl.constexpr, at most
MAX_K pointers), tl.dot with fp32 accumulation, bias and activation in the epilogue; the fp32
pre-activation is written too when a backward will need it (act' of gelu needs it). Backward: one
kernel for every grad_h_j (each tile belongs to one input and writes that input's own gradient),
one for grad_weight and grad_bias; both form grad_pre = grad_out * act'(pre) tile by tile.
More than MAX_K inputs are concatenated first (a copy), then served as one input.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._validation import check_fusion_head
from ._activations import act, grad_through
from ._common import (act_code, autotune, cdiv, define_op, dot_precision, launch, pointer_slots, savable, scalar_slots,
                      size_class, smax)
from ._differentiated import differentiated, fresh, gradients, head_of, split, wide, without_autocast
from ._matmul import dot, dot_split

MAX_K = 8
# Size arguments Triton must not specialise on (== 1, divisible by 16): each distinct
# specialisation compiles anew, and sizes change with every batch; strides stay specialised (a
# unit or 16-aligned stride is what lets loads vectorise).
SIZES = ["M", "N", "SIZE_CLASS", *(f"D{j}" for j in range(MAX_K))]

FWD_CONFIGS = [
    dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=2),
    dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3),
]
GRAD_H_CONFIGS = [  # tiles of (batch rows, input features), reduction over Dz
    dict(BM=64, BN=32, BK=32, num_warps=4, num_stages=2),
    dict(BM=128, BN=32, BK=32, num_warps=8, num_stages=3),
]
GRAD_W_CONFIGS = [  # tiles of (Dz, input features), reduction over the batch
    dict(BM=32, BN=64, BK=32, num_warps=4, num_stages=2),
    dict(BM=32, BN=128, BK=32, num_warps=8, num_stages=3),
]
# fp32 dots (FMA unless tf32 is allowed) hold their whole reduction slice (BK in the forward, BN in
# grad_h, BM in grad_w) in registers per thread: small reduction tiles.
FWD_CONFIGS_FP32 = [
    dict(BM=32, BN=32, BK=16, num_warps=4, num_stages=2),
    dict(BM=64, BN=64, BK=16, num_warps=8, num_stages=3),
]
GRAD_H_CONFIGS_FP32 = [  # 3 stages of the second spilled 4 B (sm_90, triton 3.8)
    dict(BM=32, BN=16, BK=32, num_warps=4, num_stages=2),
    dict(BM=64, BN=16, BK=64, num_warps=8, num_stages=2),
]
GRAD_W_CONFIGS_FP32 = [
    dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=2),
    dict(BM=16, BN=64, BK=64, num_warps=8, num_stages=3),
]


@triton.jit
def pick(J: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """The J-th argument (J a constexpr): per-input pointers and sizes without a pointer table."""
    if J == 0:
        r = a0
    elif J == 1:
        r = a1
    elif J == 2:
        r = a2
    elif J == 3:
        r = a3
    elif J == 4:
        r = a4
    elif J == 5:
        r = a5
    elif J == 6:
        r = a6
    else:
        r = a7
    return r


@triton.jit
def col_tiles(D0, D1, D2, D3, D4, D5, D6, D7, K: tl.constexpr, BK: tl.constexpr):
    """The number of BK-wide column tiles over the K inputs (each input's columns tiled apart)."""
    tiles = 0
    for j in tl.static_range(K):
        tiles += tl.cdiv(pick(j, D0, D1, D2, D3, D4, D5, D6, D7), BK)
    return tiles


@triton.jit
def tile_columns(t, D0, D1, D2, D3, D4, D5, D6, D7, K: tl.constexpr, BK: tl.constexpr):
    """Column tile t, counting every input's BK-wide tiles in turn: (its input j, that input's
    width, its first column in the concatenation, the tile's first column within it). Integers
    only: torch's analysis of what a kernel writes counts every argument of a call that a store's
    address depends on as written."""
    j = 0
    D = D0
    col = 0
    k0 = 0
    first = 0
    start = 0
    for i in tl.static_range(K):
        Di = pick(i, D0, D1, D2, D3, D4, D5, D6, D7)
        tiles = tl.cdiv(Di, BK)
        hit = (t >= first) & (t < first + tiles)
        j = tl.where(hit, i, j)
        D = tl.where(hit, Di, D)
        col = tl.where(hit, start, col)
        k0 = tl.where(hit, (t - first) * BK, k0)
        first += tiles
        start += Di
    return j, D, col, k0


@triton.jit
def select(j, a0, a1, a2, a3, a4, a5, a6, a7, K: tl.constexpr):
    """The j-th of a0..a7 for a run-time j < K (scalar selects: the kernels keep one copy of their
    loop body, not K)."""
    r = a0
    for i in tl.static_range(1, K):
        r = tl.where(j == i, pick(i, a0, a1, a2, a3, a4, a5, a6, a7), r)
    return r


@triton.jit
def head_tile(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
              sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
              w_ptr, swn, swk, offs_m, mask_m, offs_n, mask_n, K: tl.constexpr, H_UNIT: tl.constexpr,
              PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """[h_0..h_{K-1}] @ W.T on one (rows, outputs) tile in fp32: one loop over the column tiles of
    every input, each read through its own pointer. H_UNIT: every input's feature stride is 1."""
    acc = tl.zeros([BM, BN], tl.float32)
    tiles = col_tiles(D0, D1, D2, D3, D4, D5, D6, D7, K, BK)
    for t in range(0, tiles):
        j, D, col, k0 = tile_columns(t, D0, D1, D2, D3, D4, D5, D6, D7, K, BK)
        hp = select(j, h0, h1, h2, h3, h4, h5, h6, h7, K)
        sm = select(j, sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, K)
        offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)  # feature strides may be large
        mask_k = offs_k < D
        if H_UNIT:
            a_ptrs = hp + offs_m[:, None] * sm + offs_k[None, :]
        else:
            a_ptrs = hp + offs_m[:, None] * sm + offs_k[None, :] * select(j, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7, K)
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * swn + (col + offs_k)[:, None] * swk,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, wt, acc, PREC)
    return acc


@triton.jit(do_not_specialize=SIZES)
def fusion_fwd_kernel(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                      sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                      w_ptr, b_ptr, out_ptr, pre_ptr, M, N, swn, swk, sb, som, son, SIZE_CLASS,
                      K: tl.constexpr, H_UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      SAVE_PRE: tl.constexpr, PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # one axis of programs (CUDA limits axes 1 and 2 to 65535): tile (pid // tiles_n, pid % tiles_n)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    offs_m = (pid // tiles_n).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = (pid % tiles_n).to(tl.int64) * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = head_tile(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                    sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                    w_ptr, swn, swk, offs_m, mask_m, offs_n, mask_n, K, H_UNIT, PREC, BM, BN, BK)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * sb, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    tl.store(out_ptr + offs_m[:, None] * som + offs_n[None, :] * son,
             act(acc, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_pre_tile(g_ptr, pre_ptr, offs_m, offs_n, mask, sgm, sgn, N, ACT: tl.constexpr):
    """grad_out * act'(pre) on one (rows, Dz) tile, fp32."""
    # int64: a column-major grad_out has sgn = rows, and offs_n * sgn may pass 2^31
    g = tl.load(g_ptr + offs_m[:, None] * sgm + offs_n.to(tl.int64)[None, :] * sgn, mask=mask, other=0.0)
    g = g.to(tl.float32)
    if ACT != 0:
        pre = tl.load(pre_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        g = grad_through(g, pre, ACT)
    return g


@triton.jit(do_not_specialize=SIZES)
def fusion_grad_h_kernel(g0, g1, g2, g3, g4, g5, g6, g7, D0, D1, D2, D3, D4, D5, D6, D7,
                         go_ptr, pre_ptr, w_ptr, M, N, sgm, sgn, swn, swk, SIZE_CLASS,
                         K: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # program (row tile, column tile t) on one axis; column tile t belongs to one input, whose own
    # gradient (contiguous, D wide) it writes.
    pid = tl.program_id(0)
    tiles = col_tiles(D0, D1, D2, D3, D4, D5, D6, D7, K, BK)
    offs_m = (pid // tiles).to(tl.int64) * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    j, D, col, k0 = tile_columns(pid % tiles, D0, D1, D2, D3, D4, D5, D6, D7, K, BK)
    gp = select(j, g0, g1, g2, g3, g4, g5, g6, g7, K)
    offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
    mask_k = offs_k < D
    acc = tl.zeros([BM, BK], tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < N
        g = grad_pre_tile(go_ptr, pre_ptr, offs_m, offs_n, mask_m[:, None] & mask_n[None, :],
                          sgm, sgn, N, ACT)
        # int64: offs_n * swn passes 2^31 for a large weight (or a strided view of one)
        wt = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * swn + (col + offs_k)[None, :] * swk,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = dot_split(g, wt, acc, PREC)
    tl.store(gp + offs_m[:, None] * D + offs_k[None, :], acc.to(gp.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=SIZES)
def fusion_grad_w_kernel(h0, h1, h2, h3, h4, h5, h6, h7, D0, D1, D2, D3, D4, D5, D6, D7,
                         sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7,
                         go_ptr, pre_ptr, gw_ptr, gb_ptr, M, N, sgm, sgn, SIZE_CLASS,
                         K: tl.constexpr, H_UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                         PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Program (n-tile, t) on one axis: grad_W[n-tile, columns of tile t] = grad_pre[:, n-tile].T @
    # h_j[:, tile]; the programs of tile 0 also write grad_bias[n-tile] = grad_pre[:, n-tile].sum(0).
    # With no input columns at all the grid has one program per n-tile, for grad_bias alone.
    pid = tl.program_id(0)
    tiles = col_tiles(D0, D1, D2, D3, D4, D5, D6, D7, K, BK)
    offs_n = (pid // tl.maximum(tiles, 1)).to(tl.int64) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    t = pid % tl.maximum(tiles, 1)
    Dsum = D0 + D1 + D2 + D3 + D4 + D5 + D6 + D7  # unused slots are passed as 0
    j, D, col, k0 = tile_columns(t, D0, D1, D2, D3, D4, D5, D6, D7, K, BK)
    hp = select(j, h0, h1, h2, h3, h4, h5, h6, h7, K)
    sm = select(j, sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7, K)
    offs_k = (k0 + tl.arange(0, BK)).to(tl.int64)
    mask_k = offs_k < D
    acc = tl.zeros([BN, BK], tl.float32)
    bacc = tl.zeros([BN], tl.float32)
    for m0 in range(0, M, BM):
        offs_m = (m0 + tl.arange(0, BM)).to(tl.int64)
        mask_m = offs_m < M
        g = grad_pre_tile(go_ptr, pre_ptr, offs_m, offs_n, mask_m[:, None] & mask_n[None, :],
                          sgm, sgn, N, ACT)
        if H_UNIT:
            a_ptrs = hp + offs_m[:, None] * sm + offs_k[None, :]
        else:
            a_ptrs = hp + offs_m[:, None] * sm + offs_k[None, :] * select(j, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7, K)
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = dot_split(tl.trans(g), a, acc, PREC)
        if HAS_BIAS:
            bacc += tl.sum(g, axis=0)
    tl.store(gw_ptr + offs_n[:, None] * Dsum + (col + offs_k)[None, :],
             acc.to(gw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        if t == 0:
            tl.store(gb_ptr + offs_n, bacc.to(gb_ptr.dtype.element_ty), mask=mask_n)


# One autotuner per dtype class, each over its own configs (the launcher picks by dtype).
fusion_fwd = autotune("fusion_fwd", fusion_fwd_kernel, FWD_CONFIGS, key=["SIZE_CLASS"])
fusion_fwd_fp32 = autotune("fusion_fwd_fp32", fusion_fwd_kernel, FWD_CONFIGS_FP32, key=["SIZE_CLASS"])
fusion_grad_h = autotune("fusion_grad_h", fusion_grad_h_kernel, GRAD_H_CONFIGS, key=["SIZE_CLASS"])
fusion_grad_h_fp32 = autotune("fusion_grad_h_fp32", fusion_grad_h_kernel, GRAD_H_CONFIGS_FP32,
                              key=["SIZE_CLASS"])
fusion_grad_w = autotune("fusion_grad_w", fusion_grad_w_kernel, GRAD_W_CONFIGS, key=["SIZE_CLASS"])
fusion_grad_w_fp32 = autotune("fusion_grad_w_fp32", fusion_grad_w_kernel, GRAD_W_CONFIGS_FP32,
                              key=["SIZE_CLASS"])


def unit_feature_strides(hs: List[torch.Tensor]) -> bool:
    """Every input's features are contiguous (the kernels then index them without a multiply, and
    Triton can vectorise the loads)."""
    return all(h.stride(1) == 1 or h.shape[1] <= 1 for h in hs)


def launch_forward(hs: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                   activation: str, out: torch.Tensor, pre: Optional[torch.Tensor]) -> None:
    """Writes fusion_head(hs, ...) into out (any strides) and its fp32 pre-activation into pre
    (contiguous) when given. At most MAX_K inputs."""
    M, N = out.shape
    if M == 0 or N == 0:
        return
    K = len(hs)
    dims = [h.shape[1] for h in hs]

    def grid(meta):
        return (cdiv(M, meta["BM"]) * cdiv(N, meta["BN"]),)

    launch(fusion_fwd_fp32 if out.dtype == torch.float32 else fusion_fwd, grid,
           *pointer_slots(hs, MAX_K, hs[0]), *scalar_slots(dims, MAX_K, 0),
           *scalar_slots([h.stride(0) for h in hs], MAX_K, 0),
           *scalar_slots([h.stride(1) for h in hs], MAX_K, 0),
           weight, bias if bias is not None else weight.new_empty((0,)), out,
           pre if pre is not None else out.new_empty((0,), dtype=torch.float32),
           M, N, weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
           out.stride(0), out.stride(1), size_class(M, N, sum(dims)),
           K=K, H_UNIT=unit_feature_strides(hs), HAS_BIAS=bias is not None, ACT=act_code(activation),
           SAVE_PRE=pre is not None,
           PREC=dot_precision(out.dtype))


def _forward(hs: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str, save_pre: bool) -> List[torch.Tensor]:
    """[out, pre]: pre is the fp32 pre-activation when save_pre and act is not "none", else empty."""
    check_fusion_head(hs, weight, bias, activation, "pf_kernels_triton.fusion_head")
    if len(hs) > MAX_K:
        hs = [torch.cat(hs, dim=1)]
    M, N = hs[0].shape[0], weight.shape[0]
    out = torch.empty((M, N), dtype=hs[0].dtype, device=hs[0].device)
    keep = save_pre and activation != "none"
    pre = torch.empty((M, N) if keep else (0,), dtype=torch.float32, device=out.device)
    launch_forward(hs, weight, bias, activation, out, pre if keep else None)
    return [out, pre]


def _forward_fake(hs, weight, bias, activation, save_pre):
    M, N = hs[0].shape[0], weight.shape[0]
    keep = save_pre and activation != "none"
    return [hs[0].new_empty((M, N)), hs[0].new_empty((M, N) if keep else (0,), dtype=torch.float32)]


def backward(grad_out: torch.Tensor, hs: List[torch.Tensor], weight: torch.Tensor,
             pre: torch.Tensor, has_bias: bool, activation: str) -> List[torch.Tensor]:
    """[grad_h_1..grad_h_K, grad_weight, grad_bias (empty without bias)]; pre as _forward saved.
    All contiguous."""
    dims = [h.shape[1] for h in hs]
    if len(hs) > MAX_K:
        grads = backward(grad_out, [torch.cat(hs, dim=1)], weight, pre, has_bias, activation)
        # clones, not .contiguous(): a piece that is contiguous already (B <= 1, zero width) would be
        # a view, and a custom op's outputs must not alias each other
        return [*(g.clone(memory_format=torch.contiguous_format) for g in torch.split(grads[0], dims, dim=1)),
                grads[1], grads[2]]
    M, N, K = grad_out.shape[0], grad_out.shape[1], len(hs)
    dev, dtype = grad_out.device, hs[0].dtype
    grad_hs = [torch.empty((M, d), dtype=dtype, device=dev) for d in dims]
    grad_w = torch.empty((N, sum(dims)), dtype=dtype, device=dev)
    grad_b = torch.empty((N,) if has_bias else (0,), dtype=dtype, device=dev)
    act_id = act_code(activation)
    if act_id != 0 and (tuple(pre.shape) != (M, N) or pre.dtype != torch.float32):
        raise RuntimeError(f"pf_kernels_triton.fusion_head_backward: pre must be the forward's ({M}, {N}) "
                           f"float32 pre-activation (saved with save_pre=True), got {tuple(pre.shape)} {pre.dtype}")
    pre = pre if act_id != 0 else grad_out.new_empty((0,), dtype=torch.float32)  # never read
    prec = dot_precision(dtype)
    key = size_class(M, N, sum(dims))
    if M > 0 and sum(dims) > 0:
        def grid_h(meta):
            return (cdiv(M, meta["BM"]) * sum(cdiv(d, meta["BK"]) for d in dims),)

        launch(fusion_grad_h_fp32 if dtype == torch.float32 else fusion_grad_h, grid_h,
               *pointer_slots(grad_hs, MAX_K, grad_hs[0]), *scalar_slots(dims, MAX_K, 0),
               grad_out, pre, weight, M, N, grad_out.stride(0), grad_out.stride(1),
               weight.stride(0), weight.stride(1), key, K=K, ACT=act_id, PREC=prec)
    if N > 0:
        def grid_w(meta):
            return (cdiv(N, meta["BN"]) * smax(1, sum(cdiv(d, meta["BK"]) for d in dims)),)

        launch(fusion_grad_w_fp32 if dtype == torch.float32 else fusion_grad_w, grid_w,
               *pointer_slots(hs, MAX_K, hs[0]), *scalar_slots(dims, MAX_K, 0),
               *scalar_slots([h.stride(0) for h in hs], MAX_K, 0),
               *scalar_slots([h.stride(1) for h in hs], MAX_K, 0), grad_out, pre, grad_w,
               grad_b if has_bias else grad_w.new_empty((0,)), M, N, grad_out.stride(0),
               grad_out.stride(1), key, K=K, H_UNIT=unit_feature_strides(hs), HAS_BIAS=has_bias, ACT=act_id,
               PREC=prec)
    return [*grad_hs, grad_w, grad_b]


def _backward_fake(grad_out, hs, weight, pre, has_bias, activation):
    M, N = grad_out.shape
    return [*[h.new_empty((M, h.shape[1])) for h in hs], weight.new_empty((N, weight.shape[1])),
            weight.new_empty((N,) if has_bias else (0,))]


fusion_head_op = define_op("fusion_head", _forward, _forward_fake, [fusion_fwd, fusion_fwd_fp32])
fusion_head_backward_op = define_op("fusion_head_backward", backward, _backward_fake,
                                    [fusion_grad_h, fusion_grad_h_fp32, fusion_grad_w, fusion_grad_w_fp32])


def _setup_context(ctx, inputs, output):
    hs, weight, bias, activation, save_pre = inputs
    ctx.save_for_backward(*savable(*hs, weight, bias), output[1])
    ctx.pre_saved = save_pre or activation == "none"
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.k = len(hs)


def unsaved_pre(op: str) -> RuntimeError:
    return RuntimeError(f"pf_kernels_triton.{op} ran with save_pre=False, so its backward has no pre-activation: "
                        f"call it with save_pre=True where it is differentiated")


def _autograd_backward(ctx, grads):
    if not ctx.pre_saved:
        raise unsaved_pre("fusion_head")
    saved = ctx.saved_tensors
    hs, weight, bias, pre = list(saved[:ctx.k]), saved[ctx.k], saved[ctx.k + 1], saved[ctx.k + 2]
    grad_out = grads[0]
    if differentiated():
        with without_autocast(weight):
            weight, bias = fresh(weight, bias)
            joined, z = head_of(hs, weight, bias, ctx.activation)
            got = gradients([z], [wide(grad_out)], [joined, weight, bias])
            return split(got[0], hs), got[1], got[2], None, None
    out = fusion_head_backward_op(grad_out, hs, weight, pre, ctx.has_bias, ctx.activation)
    grad_hs, grad_w, grad_b = out[:ctx.k], out[ctx.k], out[ctx.k + 1]
    return list(grad_hs), grad_w, grad_b if ctx.has_bias else None, None, None


fusion_head_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fusion_head(hs: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: str = "relu") -> torch.Tensor:
    return fusion_head_op(list(hs), weight, bias, activation, needs_grad(*hs, weight, bias))[0]
