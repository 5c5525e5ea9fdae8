"""The benchmark grid: each case builds fresh inputs and knows the bytes and FLOPs its op must move/do."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

import pf_kernels as pk
from pf_kernels import reference

# (Dx, Dz, Dc): small (launch-bound), typical Progressive Fusion, large. Dims span 16..1024.
BACKPROJ_DIMS = {"small": (16, 16, 16), "typical": (128, 256, 32), "large": (1024, 1024, 1024)}
# K = 3 modalities: (D_1, D_2, D_3, Dz).
FUSION_DIMS = {"small": (16, 16, 16, 16), "typical": (128, 64, 32, 256), "large": (1024, 512, 256, 1024)}
BATCHES = (8, 256, 4096)
SEQ_LENS = (1, 50)
MAX_TENSOR_BYTES = 600 * 2**20  # rows whose output passes this are left out (2-core, 24 GiB machine)


@dataclass
class Case:
    op: str
    label: str                      # e.g. "B=256 T=50 typical"
    params: dict
    make_inputs: Callable[[torch.device, torch.dtype], tuple]  # fresh tensors, leaves requiring grad
    call: Callable[..., object]     # call(ops, *inputs): ops is pf_kernels.reference or a BackendOps
    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int
    flops_bwd: int


def _param(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def backproj_cases(quick: bool) -> List[Case]:
    cases = []
    dims = {"small": BACKPROJ_DIMS["small"], "typical": BACKPROJ_DIMS["typical"]} if quick else BACKPROJ_DIMS
    for name, (Dx, Dz, Dc) in dims.items():
        for B in BATCHES:
            for T in SEQ_LENS:
                out_bytes = B * T * (Dx + Dc) * 4
                if out_bytes > MAX_TENSOR_BYTES:
                    continue

                def make(device, dtype, B=B, T=T, Dx=Dx, Dz=Dz, Dc=Dc):
                    return (_param((B, T, Dx), device, dtype), _param((B, Dz), device, dtype),
                            _param((Dc, Dz), device, dtype, Dz ** -0.5), _param((Dc,), device, dtype))

                def call(ops, x, z, w, b):
                    return ops.backproj_concat(x, z, w, b, "relu")

                e = 4  # bytes per element counted at fp32; scaled by dtype in the report
                cases.append(Case(
                    "backproj_concat", f"B={B} T={T} {name}", dict(B=B, T=T, Dx=Dx, Dz=Dz, Dc=Dc), make, call,
                    bytes_fwd=e * (B * T * Dx + B * Dz + Dc * Dz + Dc + B * T * (Dx + Dc)),
                    # grad_x is a view of grad_out: backward reads the context part of grad_out
                    bytes_bwd=e * (B * T * Dc + B * Dc + B * Dz + 2 * Dc * Dz + Dc + B * Dz),
                    flops_fwd=2 * B * Dz * Dc, flops_bwd=4 * B * Dz * Dc))
    return cases


def fusion_cases(quick: bool) -> List[Case]:
    cases = []
    dims = {"small": FUSION_DIMS["small"], "typical": FUSION_DIMS["typical"]} if quick else FUSION_DIMS
    for name, (*Ds, Dz) in dims.items():
        D = sum(Ds)
        for B in BATCHES:
            def make(device, dtype, B=B, Ds=tuple(Ds), Dz=Dz, D=D):
                return (*[_param((B, d), device, dtype) for d in Ds], _param((Dz, D), device, dtype, D ** -0.5),
                        _param((Dz,), device, dtype))

            def call(ops, *args):
                *hs, w, b = args
                return ops.fusion_head(hs, w, b, "relu")

            e = 4
            cases.append(Case(
                "fusion_head", f"B={B} {name}", dict(B=B, dims=list(Ds), Dz=Dz), make, call,
                bytes_fwd=e * (B * D + Dz * D + Dz + B * Dz),
                bytes_bwd=e * (2 * B * Dz + B * D + Dz * D + B * D + Dz * D + Dz),
                flops_fwd=2 * B * D * Dz, flops_bwd=4 * B * D * Dz))
    return cases


def refine_cases(quick: bool) -> List[Case]:
    """K = 3: a vector modality and two sequences of length T; typical widths."""
    cases = []
    Ds, Dz, Dc = (128, 64, 32), 256, 32
    xdims = (32, 16, 8)
    for B in BATCHES:
        for T in SEQ_LENS:
            def make(device, dtype, B=B, T=T):
                hs = [_param((B, d), device, dtype) for d in Ds]
                head = [_param((Dz, sum(Ds)), device, dtype, sum(Ds) ** -0.5), _param((Dz,), device, dtype)]
                xs = [_param((B, xdims[0]), device, dtype), _param((B, T, xdims[1]), device, dtype),
                      _param((B, T, xdims[2]), device, dtype)]
                ws = [_param((Dc, Dz), device, dtype, Dz ** -0.5) for _ in range(3)]
                bs = [_param((Dc,), device, dtype) for _ in range(3)]
                return (*hs, *head, *xs, *ws, *bs)

            def call(ops, *a):
                z, outs = ops.refine_step(list(a[0:3]), a[3], a[4], list(a[5:8]), list(a[8:11]), list(a[11:14]),
                                          "relu", "relu")
                return (z, *outs)

            e = 4
            D = sum(Ds)
            rows = (B, B * T, B * T)
            x_elems = sum(r * d for r, d in zip(rows, xdims))
            out_elems = sum(r * (d + Dc) for r, d in zip(rows, xdims))
            cases.append(Case(
                "refine_step", f"B={B} T={T} typical", dict(B=B, T=T, dims=list(Ds), Dz=Dz, Dc=Dc, xdims=list(xdims)),
                make, call,
                bytes_fwd=e * (B * D + Dz * D + B * Dz + x_elems + out_elems + 3 * Dc * Dz),
                bytes_bwd=e * (B * Dz * 2 + B * D * 2 + 2 * Dz * D + sum(rows) * Dc + 6 * Dc * Dz),
                flops_fwd=2 * B * D * Dz + 3 * 2 * B * Dz * Dc, flops_bwd=4 * B * D * Dz + 3 * 4 * B * Dz * Dc))
    return cases


def all_cases(quick: bool, ops: Sequence[str]) -> List[Case]:
    makers = {"backproj_concat": backproj_cases, "fusion_head": fusion_cases, "refine_step": refine_cases}
    return [c for op in ops for c in makers[op](quick)]


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


__all__ = ["BackendOps", "Case", "all_cases", "reference"]
