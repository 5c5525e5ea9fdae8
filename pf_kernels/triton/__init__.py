"""The triton backend: Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

Importing this package raises ImportError when triton is missing, so the backend registry reports
the reason. Each op is registered with torch.library in the namespace pf_kernels_triton.

Environment variables (read when this package is imported):
- TRITON_INTERPRET=1: run the kernels in Triton's interpreter on CPU tensors (the tests here).
- PF_KERNELS_TRITON_AUTOTUNE=0: no autotuning; every kernel runs one fixed, safe config and
  nothing is benchmarked (quick test runs on a GPU; see _common.Tuned.safe).
- PF_KERNELS_TRITON_CONFIG=i: every kernel runs its config i (i modulo the kernel's number of
  configs), without benchmarking. For i in range(_common.max_configs()) every config of every
  kernel runs; tests do the same in-process with `_common.forced_config(i)`.
- PF_KERNELS_TRITON_TF32=1: fp32 matmuls in tf32 (default: exact fp32 dots).
Otherwise each kernel autotunes over its configs on its first call per size class (sizes bucketed
by powers of two, _common.size_class): a new batch size in the same bucket reuses the choice.

CUDA graphs: launches do no host synchronisation, so a captured call works once the same shapes
(the same size classes) have run eagerly before: autotuning (which benchmarks, synchronising) and
Triton's compilation happen on those warm-up calls, never on the captured one. With
PF_KERNELS_TRITON_AUTOTUNE=0 or PF_KERNELS_TRITON_CONFIG set, one warm-up call per shape still
compiles the kernels.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # the registry shows this message as the reason
    raise ImportError(f"triton is not importable: {type(exc).__name__}: {exc}") from exc

from typing import Optional

import torch

from ._common import INTERPRET, TF32_ENV  # noqa: F401
from .backproj_concat import backproj_concat
from .context_linear import context_linear
from .fusion_head import MAX_K, fusion_head
from .refine_step import refine_step
from .refine_step_hoisted import refine_step_hoisted

__all__ = ["backproj_concat", "context_linear", "fusion_head", "refine_step", "refine_step_hoisted", "unsupported",
           "INTERPRET", "MAX_K"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the Triton kernels take float32, float16 and bfloat16)"
    if device.type == "cpu" and not INTERPRET:
        return ("CPU tensors need TRITON_INTERPRET=1 set before pf_kernels.triton is imported "
                "(the kernels were compiled for the GPU)")
    return None
