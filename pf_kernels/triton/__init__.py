"""The triton backend: Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

Importing this package raises ImportError when triton is missing, so the backend registry reports
the reason. Each op is registered with torch.library in the namespace pf_kernels_triton.
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
from .fusion_head import MAX_K, fusion_head
from .refine_step import refine_step

__all__ = ["backproj_concat", "fusion_head", "refine_step", "unsupported", "INTERPRET", "MAX_K"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the Triton kernels take float32, float16 and bfloat16)"
    if device.type == "cpu" and not INTERPRET:
        return ("CPU tensors need TRITON_INTERPRET=1 set before pf_kernels.triton is imported "
                "(the kernels were compiled for the GPU)")
    return None
