"""The benchmark grid: each case builds fresh inputs and knows the bytes and FLOPs its op must move/do.

The full grid is every size below; `--quick` takes the rows in QUICK, and compiles torch.compile's
column only on some of them (a fresh compile costs seconds per row, mode and dtype; the table
marks the rows left out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

import pf_kernels as pk
from pf_kernels import reference

# (Dx, Dz, Dc): small (launch-bound), typical Progressive Fusion, large. Dims span 16..1024.
BACKPROJ_DIMS = {"small": (16, 16, 16), "typical": (128, 256, 32), "large": (1024, 1024, 1024)}
# K = 3 modalities: (D_1, D_2, D_3, Dz).
FUSION_DIMS = {"small": (16, 16, 16, 16), "typical": (128, 64, 32, 256), "large": (1024, 512, 256, 1024)}
BATCHES = (8, 256, 4096)
SEQ_LENS = (1, 50)
# Rows whose output passes this are left out (CPU: the 2-core, 24 GiB machine this is built on).
MAX_TENSOR_BYTES = {"cpu": 600 * 2**20, "cuda": 4 * 2**30}

# --quick, per device type: a launch-bound row, typical ones, and on a GPU rows that move >= 64 MB
# per op (the copy-bandwidth target of backproj_concat). True: torch.compile's column is compiled on
# that row in --quick too ("-q" in the table elsewhere).
QUICK = {
    "cuda": {
        "backproj_concat": {("small", 8, 1): False, ("typical", 8, 50): False, ("typical", 256, 50): False,
                            ("typical", 4096, 50): True},
        "fusion_head": {("small", 8): False, ("typical", 256): True, ("large", 4096): False},
        "refine_step": {("typical", 8, 50): True, ("typical", 256, 50): False},
    },
    # A 2-core CPU takes ~0.3 s per call of the 240 MB rows: smaller ones, to fit about 3 minutes.
    "cpu": {
        "backproj_concat": {("small", 8, 1): False, ("typical", 8, 50): False, ("typical", 256, 50): True,
                            ("typical", 4096, 1): False},
        "fusion_head": {("small", 8): False, ("typical", 256): True, ("typical", 4096): False},
        "refine_step": {("typical", 8, 50): True, ("typical", 256, 50): False},
    },
}


@dataclass
class Case:
    op: str
    label: str                      # e.g. "B=256 T=50 typical"
    params: dict
    make_inputs: Callable[[torch.device, torch.dtype], tuple]  # fresh tensors, leaves requiring grad
    call: Callable[..., object]     # call(ops, *inputs): ops is EAGER, pf_kernels.reference or a BackendOps
    bytes_fwd: int                  # counted at 4 bytes per element; scale_bytes() gives another dtype's
    bytes_bwd: int
    flops_fwd: int
    flops_bwd: int
    key: tuple = ()                 # its entry in QUICK

    def in_quick(self, device_type: str) -> bool:
        return self.key in QUICK.get(device_type, QUICK["cpu"])[self.op]

    def compile_in_quick(self, device_type: str) -> bool:
        return QUICK.get(device_type, QUICK["cpu"])[self.op].get(self.key, False)

    def bytes(self, mode: str, dtype: torch.dtype) -> int:
        moved = self.bytes_fwd + (self.bytes_bwd if mode == "fwd+bwd" else 0)
        return moved * torch.finfo(dtype).bits // 32

    def flops(self, mode: str) -> int:
        return self.flops_fwd + (self.flops_bwd if mode == "fwd+bwd" else 0)


def _param(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def _fits(out_elems: int, device_type: str) -> bool:
    return out_elems * 4 <= MAX_TENSOR_BYTES.get(device_type, MAX_TENSOR_BYTES["cpu"])


def backproj_case(name: str, Dx: int, Dz: int, Dc: int, B: int, T: int) -> Case:
    def make(device, dtype):
        return (_param((B, T, Dx), device, dtype), _param((B, Dz), device, dtype),
                _param((Dc, Dz), device, dtype, Dz ** -0.5), _param((Dc,), device, dtype))

    def call(ops, x, z, w, b):
        return ops.backproj_concat(x, z, w, b, "relu")

    e = 4
    return Case("backproj_concat", f"B={B} T={T} {name}", dict(B=B, T=T, Dx=Dx, Dz=Dz, Dc=Dc), make, call,
                bytes_fwd=e * (B * T * Dx + B * Dz + Dc * Dz + Dc + B * T * (Dx + Dc)),
                # grad_x is a view of grad_out: backward reads the context part of grad_out
                bytes_bwd=e * (B * T * Dc + B * Dc + B * Dz + 2 * Dc * Dz + Dc + B * Dz),
                flops_fwd=2 * B * Dz * Dc, flops_bwd=4 * B * Dz * Dc, key=(name, B, T))


def fusion_case(name: str, Ds: Sequence[int], Dz: int, B: int) -> Case:
    Ds, D = tuple(Ds), sum(Ds)

    def make(device, dtype):
        return (*[_param((B, d), device, dtype) for d in Ds], _param((Dz, D), device, dtype, D ** -0.5),
                _param((Dz,), device, dtype))

    def call(ops, *args):
        *hs, w, b = args
        return ops.fusion_head(hs, w, b, "relu")

    e = 4
    return Case("fusion_head", f"B={B} {name}", dict(B=B, dims=list(Ds), Dz=Dz), make, call,
                bytes_fwd=e * (B * D + Dz * D + Dz + B * Dz),
                bytes_bwd=e * (2 * B * Dz + B * D + Dz * D + B * D + Dz * D + Dz),
                flops_fwd=2 * B * D * Dz, flops_bwd=4 * B * D * Dz, key=(name, B))


def refine_case(name: str, Ds: Sequence[int], Dz: int, Dc: int, xdims: Sequence[int], B: int, T: int) -> Case:
    """K modalities: a vector (xdims[0]) and sequences of length T (the others)."""
    Ds, xdims, K = tuple(Ds), tuple(xdims), len(Ds)

    def make(device, dtype):
        hs = [_param((B, d), device, dtype) for d in Ds]
        head = [_param((Dz, sum(Ds)), device, dtype, sum(Ds) ** -0.5), _param((Dz,), device, dtype)]
        xs = [_param((B, xdims[0]), device, dtype)] + [_param((B, T, d), device, dtype) for d in xdims[1:]]
        ws = [_param((Dc, Dz), device, dtype, Dz ** -0.5) for _ in range(K)]
        bs = [_param((Dc,), device, dtype) for _ in range(K)]
        return (*hs, *head, *xs, *ws, *bs)

    def call(ops, *a):
        z, outs = ops.refine_step(list(a[0:K]), a[K], a[K + 1], list(a[K + 2:2 * K + 2]),
                                  list(a[2 * K + 2:3 * K + 2]), list(a[3 * K + 2:4 * K + 2]), "relu", "relu")
        return (z, *outs)

    e = 4
    D = sum(Ds)
    rows = (B,) + (B * T,) * (K - 1)
    x_elems = sum(r * d for r, d in zip(rows, xdims))
    out_elems = sum(r * (d + Dc) for r, d in zip(rows, xdims))
    return Case("refine_step", f"B={B} T={T} {name}", dict(B=B, T=T, dims=list(Ds), Dz=Dz, Dc=Dc, xdims=list(xdims)),
                make, call,
                bytes_fwd=e * (B * D + Dz * D + B * Dz + x_elems + out_elems + K * Dc * Dz),
                bytes_bwd=e * (B * Dz * 2 + B * D * 2 + 2 * Dz * D + sum(rows) * Dc + 2 * K * Dc * Dz),
                flops_fwd=2 * B * D * Dz + K * 2 * B * Dz * Dc, flops_bwd=4 * B * D * Dz + K * 4 * B * Dz * Dc,
                key=(name, B, T))


def backproj_cases(device_type: str = "cpu") -> List[Case]:
    return [backproj_case(name, Dx, Dz, Dc, B, T) for name, (Dx, Dz, Dc) in BACKPROJ_DIMS.items()
            for B in BATCHES for T in SEQ_LENS if _fits(B * T * (Dx + Dc), device_type)]


def fusion_cases(device_type: str = "cpu") -> List[Case]:
    return [fusion_case(name, Ds, Dz, B) for name, (*Ds, Dz) in FUSION_DIMS.items() for B in BATCHES]


def refine_cases(device_type: str = "cpu") -> List[Case]:
    """K = 3: a vector modality and two sequences of length T; typical widths."""
    return [refine_case("typical", (128, 64, 32), 256, 32, (32, 16, 8), B, T) for B in BATCHES for T in SEQ_LENS]


def tiny_cases() -> List[Case]:
    """One tiny case per op, odd sizes (for the benchmark's own test)."""
    return [backproj_case("tiny", 5, 6, 3, 2, 3), fusion_case("tiny", (3, 4, 2), 5, 2),
            refine_case("tiny", (3, 4, 2), 5, 3, (2, 3, 4), 2, 3)]


OPS = ("backproj_concat", "fusion_head", "refine_step")
_MAKERS = {"backproj_concat": backproj_cases, "fusion_head": fusion_cases, "refine_step": refine_cases}


def all_cases(quick: bool, ops: Sequence[str], device_type: str = "cpu") -> List[Case]:
    return [c for op in ops for c in _MAKERS[op](device_type) if c.in_quick(device_type) or not quick]


class BackendOps:
    """The functional ops of pf_kernels bound to one backend, with the reference's signatures."""

    def __init__(self, backend: str):
        self.backend = backend

    def backproj_concat(self, *args):
        return pk.backproj_concat(*args, backend=self.backend)

    def fusion_head(self, *args):
        return pk.fusion_head(*args, backend=self.backend)

    def refine_step(self, *args):
        return pk.refine_step(*args, backend=self.backend)


class EagerOps:
    """The competitor: the ops as plain PyTorch in the input dtype, as a user's model writes them.

    For fp32 this is the reference's arithmetic. For 16-bit inputs the reference computes in fp32
    (it is the ground truth of the tests); a user's bf16 model runs F.linear in bf16 (cuBLAS
    accumulates in fp32), and that is what the fused kernels must beat.
    """

    @staticmethod
    def backproj_concat(x, z, weight, bias=None, activation="relu"):
        context = reference.apply_activation(F.linear(z, weight, bias), activation)
        context = context.view(context.shape[0], *([1] * (x.dim() - 2)), context.shape[1])
        return torch.cat([x, context.expand(*x.shape[:-1], context.shape[-1])], dim=-1)

    @staticmethod
    def fusion_head(hs, weight, bias=None, activation="relu"):
        return reference.apply_activation(F.linear(torch.cat(list(hs), dim=-1), weight, bias), activation)

    @classmethod
    def refine_step(cls, hs, head_weight, head_bias, xs, bp_weights, bp_biases, head_activation="relu",
                    backproj_activation="relu"):
        z = cls.fusion_head(hs, head_weight, head_bias, head_activation)
        return z, [cls.backproj_concat(x, z, w, b, backproj_activation) for x, w, b in zip(xs, bp_weights, bp_biases)]


EAGER = EagerOps()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if shapes differ, nan propagates as inf)."""
    if out.shape != ref.shape:
        return math.inf
    diff = torch.linalg.vector_norm((out.double() - ref.double()).flatten()).item()
    norm = torch.linalg.vector_norm(ref.double().flatten()).item()
    err = diff / max(norm, 1e-30)
    return err if math.isfinite(err) else math.inf


# Relative-error bound for "this provider computed the op": far above rounding, far below a bug.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-9}


__all__ = ["BackendOps", "Case", "EAGER", "OPS", "TOLERANCE", "all_cases", "reference", "relative_error"]
