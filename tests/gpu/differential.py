"""Independent differential check of every op on one or more backends.

Random cases, reproducible from (seed, case index): batch sizes from 0 up, odd feature widths,
0-4 position dims, non-contiguous and misaligned inputs (permuted storage, strided slices, a
storage offset of one element, which breaks 16-byte vector access), every activation, bias or not,
fp32/bf16/fp16 (and fp64 where the backend takes it), K > 8 head inputs and more modalities than
the one-launch kernels take. Each case's forward and every gradient are held against a float64
reference written here, independently of pf_kernels.reference, by the rule of the test suite:
error <= 2 x (the larger error of eager PyTorch in the same dtype and of the definition computed
in fp32, rounded where DESIGN §1 rounds) + a floor. `--limits` adds the sizes where
launch grids, shared memory and 32-bit offsets run out (GPU only: gigabytes).

  python tests/gpu/differential.py --device cuda --backends cuda,triton --seconds 60 [--limits]

On a CPU (the cpu backend, triton under TRITON_INTERPRET=1) it is the CPU-verifiable twin of the
GPU run; tests/test_gpu_check.py runs it so. Prints each failure with what reproduces it and one
summary line per backend; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import traceback
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
FLOORS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def act64(y: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return y
    if name == "relu":
        return torch.relu(y)  # keeps NaN, as every backend must
    if name == "gelu":
        return 0.5 * y * torch.erfc(-y / math.sqrt(2.0))
    if name == "tanh":
        return torch.tanh(y)
    return torch.sigmoid(y)


def broadcast_to_positions(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """c (B, D) over like's positions (B, *S, _) -> (B, *S, D)."""
    return c.view(c.shape[0], *([1] * (like.dim() - 2)), c.shape[1]).expand(*like.shape[:-1], c.shape[1])


class _RoundBoth(torch.autograd.Function):
    """t rounded to dtype, and so is its gradient (a 16-bit tensor between two ops)."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = dtype
        return t.to(dtype).to(t.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def rounding(dtype: torch.dtype, grads_too: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Where an op's definition rounds an intermediate to the input dtype (z between the head and
    the back-projections, context_linear's context), the plain ops apply this.

    For the float64 reference: the value rounded, its gradient passed straight through. Without it,
    from an unrounded z, a 16-bit implementation's relu pre-activations near 0 fall on the other
    side of the kink at random, and its gradient then differs by a whole term (0.3% of the 16-bit
    cases failed so). For the fp32 yardstick (grads_too): the gradient rounded as well, as it is
    between two ops."""
    def rnd(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == dtype:
            return t
        if grads_too:
            return _RoundBoth.apply(t, dtype)
        return t + (t.to(dtype).to(t.dtype) - t).detach()
    return rnd


# The ops, written from their definitions (DESIGN.md §1, §7), in whatever dtype they are given:
# float64 for the reference, the case's dtype for eager PyTorch, fp32 for the yardstick of an
# fp32-accumulating implementation; rnd (see rounding) where the definition rounds an intermediate.
def plain_backproj(x, z, w, b, a):
    ctx = act64(F.linear(z, w, b), a)
    return torch.cat([x, broadcast_to_positions(ctx, x)], -1)


def plain_head(hs, w, b, a):
    return act64(F.linear(torch.cat(hs, -1), w, b), a)


def plain_context_linear(p, z, bw, bb, pw, a, out_a, rnd):
    term = F.linear(rnd(act64(F.linear(z, bw, bb), a)), pw)
    return act64(p + broadcast_to_positions(term, p), out_a)


class Case:
    """One random call: tensors (leaves) and how to call an op on them."""

    def __init__(self, op: str, dtype: torch.dtype, tensors: List[Optional[torch.Tensor]],
                 call: Callable, plain: Callable, desc: str):
        self.op, self.dtype, self.tensors, self.call, self.plain, self.desc = op, dtype, tensors, call, plain, desc


def make_tensor(shape, dtype, device, rng: random.Random, layout: str, scale: float = 1.0) -> torch.Tensor:
    """Fresh normal values in one of several memory layouts (never zeros)."""
    shape = tuple(shape)
    n = math.prod(shape)
    gen = torch.Generator(device="cpu").manual_seed(rng.getrandbits(62))
    if layout == "offset":  # one element into its storage: misaligned for vector access
        base = (torch.randn(n + 1, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        return base[1:].view(shape)
    if layout == "permuted" and len(shape) >= 2:
        t = (torch.randn(*reversed(shape), generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.permute(*reversed(range(len(shape))))
    if layout == "strided" and len(shape) >= 1:
        t = (torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen, dtype=torch.float64) * scale)
        return t.to(dtype).to(device)[..., 1::2]
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def draw_positions(rng: random.Random, max_positions: int) -> List[int]:
    rank = rng.choice([0, 0, 1, 1, 1, 2, 2, 3, 4])
    sizes = []
    for _ in range(rank):
        sizes.append(rng.choice([1, 2, 3, 5, 7, 16, 31, 64, 100, 257]))
    while math.prod(sizes or [1]) > max_positions:
        sizes[sizes.index(max(sizes))] //= 2
    return sizes


def draw_case(op: str, dtype: torch.dtype, device: str, rng: random.Random, budget: int) -> Case:
    """A random call of op whose largest tensor has about `budget` elements at most."""
    def width(lo=1, hi=300):
        return rng.choice([lo, lo + 1, 3, 7, 8, 16, 31, 33, 64, 100, 127, 128, 130, 255, hi])

    def layout():
        return rng.choice(["contiguous", "contiguous", "permuted", "strided", "offset"])

    def t(shape, scale=1.0):
        return make_tensor(shape, dtype, device, rng, layout(), scale)

    B = rng.choice([0, 1, 2, 3, 5, 8, 17, 33, 64, 130, 257, 1000])
    a, bias = rng.choice(ACTIVATIONS), rng.random() < 0.7

    def fit(S, row, shrink_batch=True):
        """Positions S shrunk, then B (before any tensor is made), until B * prod(S) * row <= budget."""
        nonlocal B
        S = list(S)
        while B * math.prod(S or [1]) * row > budget and S and max(S) > 1:
            S[S.index(max(S))] //= 2
        while shrink_batch and B * math.prod(S or [1]) * row > budget and B > 1:
            B //= 2
        return S

    if op == "backproj_concat":
        Dx, Dz, Dc = width(0), width(), width()
        S = fit(draw_positions(rng, 4096), Dx + Dc)
        x, z, w = t((B, *S, Dx)), t((B, Dz)), t((Dc, Dz), Dz ** -0.5)
        b = t((Dc,)) if bias else None
        return Case(op, dtype, [x, z, w, b],
                    lambda ops, x, z, w, b: ops.backproj_concat(x, z, w, b, a),
                    lambda rnd, x, z, w, b: plain_backproj(x, z, w, b, a),
                    f"B={B} S={S} Dx={Dx} Dz={Dz} Dc={Dc} act={a} bias={bias}")
    if op == "fusion_head":
        dims = [width(0, 200) for _ in range(rng.choice([1, 2, 3, 4, 8, 9, 11]))]
        if sum(dims) == 0:
            dims[0] = 5
        Dz = width()
        fit([], sum(dims) + Dz)
        hs = [t((B, d)) for d in dims]
        w, b = t((Dz, sum(dims)), sum(dims) ** -0.5), (t((Dz,)) if bias else None)
        k = len(dims)
        return Case(op, dtype, [*hs, w, b],
                    lambda ops, *ts: ops.fusion_head(list(ts[:k]), ts[k], ts[k + 1], a),
                    lambda rnd, *ts: plain_head(list(ts[:k]), ts[k], ts[k + 1], a),
                    f"B={B} dims={dims} Dz={Dz} act={a} bias={bias}")
    if op == "backproj_concat_grouped":
        m, Dz = rng.choice([1, 2, 3, 5]), width()
        Dxs = [width(0) for _ in range(m)]
        fit([], max(Dxs) + 300)
        xs = [t((B, *fit(draw_positions(rng, 1024), Dx + 300, False), Dx)) for Dx in Dxs]
        ws = [t((width(), Dz), Dz ** -0.5) for _ in range(m)]
        bs = [t((w.shape[0],)) if rng.random() < 0.7 else None for w in ws]
        z = t((B, Dz))

        def call(ops, z, *ts):
            return ops.backproj_concat_grouped(list(ts[:m]), z, list(ts[m:2 * m]), list(ts[2 * m:]), a)

        def plain(rnd, z, *ts):
            return [plain_backproj(x, z, w, b_, a) for x, w, b_ in zip(ts[:m], ts[m:2 * m], ts[2 * m:])]

        return Case(op, dtype, [z, *xs, *ws, *bs], call, plain,
                    f"B={B} xs={[tuple(x.shape) for x in xs]} Dz={Dz} Dc={[w.shape[0] for w in ws]} act={a}")
    if op == "refine_step":
        dims = [width(1, 130) for _ in range(rng.choice([1, 2, 3, 8, 9]))]
        m, Dz = rng.choice([1, 2, 3, 4, 5]), rng.choice([1, 7, 33, 64, 127, 128, 129, 200])
        head_a = rng.choice(ACTIVATIONS)
        Dxs = [width(0, 64) for _ in range(m)]
        fit([], max(sum(dims) + Dz, max(Dxs) + 64))
        hs = [t((B, d)) for d in dims]
        hw, hb = t((Dz, sum(dims)), sum(dims) ** -0.5), (t((Dz,)) if bias else None)
        xs = [t((B, *fit(draw_positions(rng, 512), Dx + 64, False), Dx)) for Dx in Dxs]
        ws = [t((width(1, 64), Dz), Dz ** -0.5) for _ in range(m)]
        bs = [t((w.shape[0],)) if rng.random() < 0.7 else None for w in ws]
        k = len(dims)

        def call(ops, hw, hb, *ts):
            z, outs = ops.refine_step(list(ts[:k]), hw, hb, list(ts[k:k + m]), list(ts[k + m:k + 2 * m]),
                                      list(ts[k + 2 * m:]), head_a, a)
            return [z, *outs]

        def plain(rnd, hw, hb, *ts):
            z = plain_head(list(ts[:k]), hw, hb, head_a)
            # each back-projection reads z as returned: one rounding per read (a gradient each)
            return [z, *(plain_backproj(x, rnd(z), w, b_, a) for x, w, b_ in
                         zip(ts[k:k + m], ts[k + m:k + 2 * m], ts[k + 2 * m:]))]

        return Case(op, dtype, [hw, hb, *hs, *xs, *ws, *bs], call, plain,
                    f"B={B} dims={dims} Dz={Dz} xs={[tuple(x.shape) for x in xs]} head={head_a} bp={a}")
    if op == "refine_step_hoisted":
        dims = [width(1, 130) for _ in range(rng.choice([1, 2, 3, 8, 9]))]
        m, Dz = rng.choice([1, 2, 3, 4, 5]), rng.choice([1, 7, 33, 64, 127, 128, 129, 200])
        head_a, out_as = rng.choice(ACTIVATIONS), [rng.choice(ACTIVATIONS) for _ in range(m)]
        Hs = [width(1, 130) for _ in range(m)]
        fit([], max(sum(dims) + Dz, max(Hs) + 64))
        hs = [t((B, d)) for d in dims]
        hw, hb = t((Dz, sum(dims)), sum(dims) ** -0.5), (t((Dz,)) if bias else None)
        ps = [t((B, *fit(draw_positions(rng, 512), H, False), H)) for H in Hs]
        ws = [t((width(1, 64), Dz), Dz ** -0.5) for _ in range(m)]
        bs = [t((w.shape[0],)) if rng.random() < 0.7 else None for w in ws]
        vs = [t((H, w.shape[0]), w.shape[0] ** -0.5) for H, w in zip(Hs, ws)]
        k = len(dims)

        def call(ops, hw, hb, *ts):
            z, outs = ops.refine_step_hoisted(list(ts[:k]), hw, hb, list(ts[k:k + m]), list(ts[k + m:k + 2 * m]),
                                              list(ts[k + 2 * m:k + 3 * m]), list(ts[k + 3 * m:]), head_a, a, out_as)
            return [z, *outs]

        def plain(rnd, hw, hb, *ts):
            z = plain_head(list(ts[:k]), hw, hb, head_a)
            # each modality reads z as returned: one rounding per read (a gradient each)
            return [z, *(plain_context_linear(p, rnd(z), w, b_, v, a, out_a, rnd) for p, w, b_, v, out_a in
                         zip(ts[k:k + m], ts[k + m:k + 2 * m], ts[k + 2 * m:k + 3 * m], ts[k + 3 * m:], out_as))]

        return Case(op, dtype, [hw, hb, *hs, *ps, *ws, *bs, *vs], call, plain,
                    f"B={B} dims={dims} Dz={Dz} ps={[tuple(p.shape) for p in ps]} head={head_a} bp={a} out={out_as}")
    if op == "context_linear":
        H, Dz, Dc = width(), width(), width(1, 64)
        S = fit(draw_positions(rng, 4096), H)
        out_a = rng.choice(ACTIVATIONS)
        p, z = t((B, *S, H)), t((B, Dz))
        bw, bb = t((Dc, Dz), Dz ** -0.5), (t((Dc,)) if bias else None)
        pw = t((H, Dc), Dc ** -0.5)
        return Case(op, dtype, [p, z, bw, bb, pw],
                    lambda ops, p, z, bw, bb, pw: ops.context_linear(p, z, bw, bb, pw, a, out_a),
                    lambda rnd, p, z, bw, bb, pw: plain_context_linear(p, z, bw, bb, pw, a, out_a, rnd),
                    f"B={B} S={S} H={H} Dz={Dz} Dc={Dc} act={a} out_act={out_a} bias={bias}")
    raise ValueError(op)


class BackendOps:
    """pf_kernels' functional ops bound to one backend."""

    def __init__(self, pk, backend: str):
        self.pk, self.backend = pk, backend

    def __getattr__(self, op):
        fn = getattr(self.pk, op)
        return lambda *args: fn(*args, backend=self.backend)


def _as_list(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _forward_backward(fn: Callable, leaves: Sequence[Optional[torch.Tensor]], grad_seed: int,
                      grad_dtype: Optional[torch.dtype] = None):
    """Outputs and the gradient of every leaf for random output gradients (drawn from grad_seed,
    rounded to grad_dtype where given, else to each output's dtype)."""
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    outs = _as_list(fn(*inputs))
    gen = torch.Generator(device="cpu").manual_seed(grad_seed)
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(grad_dtype or o.dtype).to(o.dtype)
             .to(o.device) for o in outs]
    wanted = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(outs, wanted, gouts, allow_unused=True) if wanted else []
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wanted)]
    return [o.detach() for o in outs], list(grads)


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    diff = (got.double() - want).abs()
    both_nan = torch.isnan(got.double()) & torch.isnan(want)
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


# fp32 yardsticks of a 16-bit case: the leaves as they are, then nudged by an ulp at random.
YARDSTICK_SAMPLES = 3


def _nudged(t: torch.Tensor, sample: int, seed: int) -> torch.Tensor:
    """t in fp32; for sample > 0, each element moved to a neighbouring value of t's dtype, or kept,
    at random. Where a result is the small difference of large terms (a gradient summed over 50k
    positions, then over Dz), its rounding error is a random draw whose spread one sample does not
    show: the nudged inputs give other draws, and the input sensitivity besides."""
    t32 = t.float()
    if sample == 0:
        return t32
    gen = torch.Generator(device="cpu").manual_seed(seed * 7919 + sample)
    step = torch.randint(-1, 2, t.shape, generator=gen).to(t.device)
    ulp = torch.finfo(t.dtype).eps * t32.abs().clamp_min(torch.finfo(t.dtype).tiny)
    return (t32 + step * ulp).to(t.dtype).float()


def check_case(case: Case, backend_ops: BackendOps, grad_seed: int) -> List[str]:
    """Problems found (empty when the case passes).

    The yardstick of each output and gradient is the largest error of implementations of the
    definition: eager PyTorch in the case's dtype and (16-bit cases) the plain ops computed in fp32
    with the intermediates, outputs and gradients rounded to the case's dtype, as DESIGN §1 asks
    of every op, from the leaves and from leaves nudged by an ulp (_nudged). Eager alone is a noisy
    yardstick where an output has few elements (a bias gradient summed over many rows): its error
    there can be 10x below the typical by luck."""
    dtype = case.dtype
    exact_leaves = [t.double() if t is not None else None for t in case.tensors]
    exact_out, exact_grads = _forward_backward(lambda *ts: case.plain(rounding(dtype, False), *ts),
                                               exact_leaves, grad_seed, dtype)
    eager_out, eager_grads = _forward_backward(lambda *ts: case.plain(rounding(dtype, False), *ts),
                                               case.tensors, grad_seed)
    yard = [(eager_out, eager_grads)]
    if dtype in (torch.float16, torch.bfloat16):
        for sample in range(YARDSTICK_SAMPLES):
            leaves = [_nudged(t, sample, grad_seed) if t is not None else None for t in case.tensors]
            outs, grads = _forward_backward(lambda *ts: case.plain(rounding(dtype, True), *ts),
                                            leaves, grad_seed, dtype)
            yard.append(([o.to(dtype) for o in outs], [g.to(dtype) for g in grads]))
    got_out, got_grads = _forward_backward(lambda *ts: case.call(backend_ops, *ts), case.tensors, grad_seed)
    problems = []
    if len(got_out) != len(exact_out):
        problems.append(f"{len(got_out)} outputs, expected {len(exact_out)}")
    pairs = [(f"output {i}", got_out, exact_out, 0, i) for i in range(min(len(got_out), len(exact_out)))]
    pairs += [(f"grad {i}", got_grads, exact_grads, 1, i) for i in range(len(exact_grads))]
    for what, gots, exacts, part, i in pairs:
        got, exact = gots[i], exacts[i]
        if got.shape != exact.shape:
            problems.append(f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}")
            continue
        want_dtype = dtype if part == 0 else eager_grads[i].dtype
        if got.dtype != want_dtype:
            problems.append(f"{what}: dtype {got.dtype}, expected {want_dtype}")
        err = _error(got, exact)
        yard_err = max(_error(y[part][i], exact) for y in yard)
        scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
        bound = 2 * yard_err + FLOORS[dtype] * scale
        if not err <= bound:
            problems.append(f"{what}: error {err:.3g} > bound {bound:.3g} (yardstick {yard_err:.3g}, "
                            f"eager {_error(eager_out[i] if part == 0 else eager_grads[i], exact):.3g}, "
                            f"scale {scale:.3g})")
    return problems


def limit_cases(device: str, dtype: torch.dtype) -> List[tuple]:
    """(name, make, check) at the sizes where launch grids, shared memory and 32-bit offsets run
    out: check(name, make, backend_ops) -> problems."""
    def backproj(B, S, Dx, Dz, Dc, dt=dtype):
        g = torch.Generator(device=device).manual_seed(B + Dc)
        x = torch.randn(B, *S, Dx, device=device, dtype=dt, generator=g)
        z = torch.randn(B, Dz, device=device, dtype=dt, generator=g)
        w = torch.randn(Dc, Dz, device=device, dtype=dt, generator=g) * Dz ** -0.5
        b = torch.randn(Dc, device=device, dtype=dt, generator=g)
        return x, z, w, b
    def head(B, D, N, dt=torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(B + N)
        h = torch.randn(B, D, device=device, dtype=dt, generator=g)
        w = torch.randn(N, D, device=device, dtype=dt, generator=g) * D ** -0.5
        b = torch.randn(N, device=device, dtype=dt, generator=g)
        return h, w, b
    return [
        ("batch > 65535 (grid y/z)", lambda: backproj(70_000, (), 3, 5, 4), check_limit),
        ("batch > 2,097,120", lambda: backproj(2_200_000, (), 2, 3, 2), check_limit),
        ("positions > 2^21 (P blocks on grid y)", lambda: backproj(1, (2_200_000,), 2, 3, 2), check_limit),
        ("Dc = 60000 (beyond shared memory)", lambda: backproj(2, (3,), 5, 8, 60_000), check_limit),
        ("output >= 2^31 elements (int32 offsets)", lambda: backproj(4, (1 << 20,), 512, 8, 8, torch.bfloat16),
         check_limit),
        ("fusion_head, column-major grad_out >= 2^31 elements (int32 offsets)",
         lambda: head((1 << 21) + 3, 8, 1040), check_fusion_limit),
    ]


def check_limit(name: str, make: Callable, backend_ops: BackendOps, act: str = "tanh") -> List[str]:
    x, z, w, b = make()
    B, Dx = x.shape[0], x.shape[-1]
    out = backend_ops.backproj_concat(x, z, w, b, act)
    problems = []
    if out.shape != (*x.shape[:-1], Dx + w.shape[0]):
        return [f"shape {tuple(out.shape)}"]
    ctx = act64(F.linear(z.double(), w.double(), b.double()), act)
    xf, of = x.reshape(B, -1, Dx), out.reshape(B, -1, out.shape[-1])
    P = xf.shape[1]
    for p in sorted({0, 1, P // 2, P - 2, P - 1} & set(range(P))):
        for bi in sorted({0, B // 2, B - 1}):
            if not torch.equal(of[bi, p, :Dx], xf[bi, p]):
                problems.append(f"x part differs at b={bi} p={p}")
            err = (of[bi, p, Dx:].double() - ctx[bi]).abs().max().item()
            if err > 4 * FLOORS[x.dtype]:
                problems.append(f"context differs at b={bi} p={p}: {err:.3g}")
    # backward: the context gradient is grad_out's context part summed over positions
    g = torch.randn_like(out)
    zz, ww, bb = (t.detach().clone().requires_grad_(True) for t in (z, w, b))
    gz, gw, gb = torch.autograd.grad(backend_ops.backproj_concat(x, zz, ww, bb, act), (zz, ww, bb), g)
    z64, w64, b64 = (t.double().requires_grad_(True) for t in (z, w, b))
    gsum = g.reshape(B, -1, g.shape[-1])[..., Dx:].double().sum(1)
    want = torch.autograd.grad(act64(F.linear(z64, w64, b64), act), (z64, w64, b64), gsum)
    for n, got, ref in zip(("grad_z", "grad_weight", "grad_bias"), (gz, gw, gb), want):
        scale = max(1.0, ref.abs().max().item())
        err = (got.double() - ref).abs().max().item()
        if err > 8 * FLOORS[x.dtype] * scale * max(1.0, math.log2(P)):
            problems.append(f"{n}: error {err:.3g} (scale {scale:.3g})")
    del x, z, w, b, out, g
    return problems


def check_fusion_limit(name: str, make: Callable, backend_ops: BackendOps) -> List[str]:
    """fusion_head forward and backward, the output gradient column-major (a stride of B between
    its columns), against fp32 on the device (a float64 copy would not fit)."""
    h, w, b = make()
    B, N = h.shape[0], w.shape[0]
    hh, ww, bb = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    out = backend_ops.fusion_head([hh], ww, bb, "none")
    problems = []

    def compare(what, got, want):
        scale = max(1.0, want.abs().max().item())
        err = (got.float() - want).abs().max().item()
        if not err <= 4 * FLOORS[h.dtype] * scale:
            problems.append(f"{what}: error {err:.3g} (scale {scale:.3g})")

    compare("out", out.detach(), F.linear(h.float(), w.float(), b.float()))
    g = torch.randn(N, B, device=h.device, dtype=h.dtype).t()
    gh, gw, gb = torch.autograd.grad(out, (hh, ww, bb), g)
    del out
    g32 = g.float()
    compare("grad_h", gh, g32 @ w.float())
    compare("grad_weight", gw, g32.t() @ h.float())
    compare("grad_bias", gb, g32.sum(0))
    return problems


def default_budget(device: str, backend: str) -> int:
    """Elements of the largest tensor of a case: big enough for several blocks and tails, small
    enough for many cases in the time budget (the Triton interpreter runs ~1e5 times slower)."""
    if device == "cuda":
        return 1 << 22
    return 1 << 12 if backend == "triton" else 1 << 17


def backend_takes(pk, backend: str, op: str, device: str, dtype: torch.dtype) -> bool:
    from pf_kernels._dispatch import _BACKENDS, _refusal
    return _refusal(_BACKENDS[backend], op, torch.device(device), dtype) is None


def _case_seeds(seed: int):
    """Each case's own seed, in case order: case i is drawn from the i-th."""
    rng = random.Random(seed)
    while True:
        yield rng.getrandbits(62)


def run(device: str, backends: Sequence[str], seconds: float, seed: int, limits: bool,
        max_cases: Optional[int] = None, budget: Optional[int] = None, out=None,
        only_case: Optional[int] = None) -> int:
    import pf_kernels as pk

    out = out or sys.stdout

    ops = ["backproj_concat", "fusion_head", "backproj_concat_grouped", "refine_step"]
    ops += [op for op in ("context_linear", "refine_step_hoisted") if hasattr(pk, op)]
    failures = 0
    for backend in backends:
        info = pk.available_backends()[backend]
        if not info["available"] or (device not in info["devices"] and "*" not in info["devices"]):
            print(f"differential {backend}: SKIPPED ({info['reason'] or 'does not serve ' + device})", file=out)
            continue
        dtypes = [d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
                  if backend_takes(pk, backend, "fusion_head", device, d)]
        backend_ops = BackendOps(pk, backend)
        case_seeds = _case_seeds(seed)
        start, count, failed, per_op = time.perf_counter(), 0, 0, {}
        while time.perf_counter() - start < seconds and (max_cases is None or count < max_cases):
            index = count
            case_seed = next(case_seeds)
            if only_case is not None and index != only_case:
                if index > only_case:
                    break
                count += 1
                continue
            op = ops[index % len(ops)]
            dtype = dtypes[(index // len(ops)) % len(dtypes)]
            if not backend_takes(pk, backend, op, device, dtype):
                count += 1
                continue
            case = None
            try:
                case = draw_case(op, dtype, device, random.Random(case_seed), budget or default_budget(device, backend))
                problems = check_case(case, backend_ops, grad_seed=index)
            except Exception as exc:  # a crash is a failure of this case, with its trace
                problems = [f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"]
            per_op[op] = per_op.get(op, 0) + 1
            if problems:
                failed += 1
                desc = case.desc if case is not None else "(case not drawn)"
                print(f"FAIL {backend} case {index} (seed {seed}) {op} {str(dtype)[6:]} {desc}: "
                      + "; ".join(problems[:4]), file=out)
            count += 1
        limit_results = []
        if limits:
            for dtype in (torch.float32,):
                for name, make, check in limit_cases(device, dtype):
                    try:
                        problems = check(name, make, backend_ops)
                    except Exception as exc:
                        problems = [f"raised {type(exc).__name__}: {str(exc)[:300]}"]
                    torch.cuda.empty_cache() if device == "cuda" else None
                    limit_results.append((name, problems))
                    if problems:
                        failed += 1
                        print(f"FAIL {backend} limit case {name}: " + "; ".join(problems[:4]), file=out)
        elapsed = time.perf_counter() - start
        cases = f"case {only_case} of seed {seed}" if only_case is not None else f"{count} cases"
        print(f"differential {backend}: {cases} ({', '.join(f'{k} {v}' for k, v in per_op.items())})"
              f"{f', {len(limit_results)} limit cases' if limits else ''}, {failed} failed, "
              f"dtypes {[str(d)[6:] for d in dtypes]}, {elapsed:.0f} s", file=out)
        failures += failed
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=None,
                        help="comma-separated; default: cuda,triton on cuda, cpu,triton on cpu")
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget per backend")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--budget", type=int, default=None, help="elements of a case's largest tensor")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("PF_DIFF_SEED", "20261126")))
    parser.add_argument("--limits", action="store_true", help="the GPU limit cases (gigabytes)")
    parser.add_argument("--case", type=int, default=None,
                        help="only this case (a FAIL line's 'case N'; same --seed, --budget and backends)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("differential: SKIPPED (no CUDA device)")
        return 0
    if args.device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton.language is imported: the CPU twin of triton
    backends = (args.backends or ("cuda,triton" if args.device == "cuda" else "cpu,triton")).split(",")
    failures = run(args.device, backends, args.seconds, args.seed, args.limits, args.max_cases, args.budget,
                   only_case=args.case)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
