"""Shared by the Triton ops: interpreter detection, autotune configs, dot precision, strides of
position dims, and the torch.library registration of an op."""
from __future__ import annotations

import os
from typing import Callable, List, Sequence, Tuple

import torch
import triton

from ._activations import CODES

# Fixed when the kernels are decorated: @triton.jit returns an interpreted function then.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# fp32 matmuls: exact ("ieee") unless tf32 is allowed explicitly.
TF32_ENV = "PF_KERNELS_TRITON_TF32"
NAMESPACE = "pf_kernels_triton"
MAX_POS_DIMS = 3  # position dims the kernels index with strides; more are merged by reshape


def configs(options: Sequence[dict]) -> List[triton.Config]:
    """Autotune configs. Under the interpreter only the first: autotuning there would need a GPU
    driver to time with (and would be slow)."""
    made = [triton.Config({k: v for k, v in o.items() if k not in ("num_warps", "num_stages")},
                          num_warps=o.get("num_warps", 4), num_stages=o.get("num_stages", 2))
            for o in options]
    return made[:1] if INTERPRET else made


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and os.environ.get(TF32_ENV) != "1":
        return "ieee"
    return "tf32"  # the default; ignored for 16-bit inputs


def act_code(activation: str) -> int:
    return CODES[activation]


def positions(t: torch.Tensor) -> Tuple[torch.Tensor, List[int], List[int]]:
    """t (B, *S, D) as (t', sizes, strides) with exactly MAX_POS_DIMS position dims (size-1 dims
    padded in front). More position dims than that are merged by reshape (a copy only where the
    strides do not allow a view)."""
    S = list(t.shape[1:-1])
    if len(S) > MAX_POS_DIMS:
        lead = S[: len(S) - MAX_POS_DIMS + 1]
        n = 1
        for s in lead:
            n *= s
        t = t.reshape(t.shape[0], n, *S[len(lead):], t.shape[-1])
        S = list(t.shape[1:-1])
    pad = MAX_POS_DIMS - len(S)
    sizes = [1] * pad + S
    strides = [0] * pad + [t.stride(i + 1) for i in range(len(S))]
    return t, sizes, strides


def define_op(name: str, impl: Callable, fake: Callable):
    """Registers impl as the op pf_kernels_triton::name.

    On the GPU: torch.library.triton_op, so torch.compile sees the kernels (wrap_triton). Under the
    interpreter triton_op cannot serve: its fake implementation is the launcher itself, and an
    interpreted kernel reads the data of fake tensors. There the op is a torch.library.custom_op
    (opaque to torch.compile, no graph break) with its own fake implementation.
    """
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, impl, mutates_args=())
        op.register_fake(fake)
    else:
        op = torch.library.triton_op(qualname, impl, mutates_args=())
    return op


def launch(kernel):
    """The kernel as the launchers call it: wrapped for tracing where that applies."""
    return torch.library.wrap_triton(kernel)
