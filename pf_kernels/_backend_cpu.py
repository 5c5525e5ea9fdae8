"""The cpu backend: the C++ kernels of pf_kernels._C on CPU tensors (fp32, fp64, fp16, bf16)."""
import torch

from ._extension import load, unsupported  # noqa: F401  (the dtypes the kernels take)

load()

# The op overloads themselves: no Python between the dispatcher and the caller.
backproj_concat = torch.ops.pf_kernels.backproj_concat.default
fusion_head = torch.ops.pf_kernels.fusion_head.default
context_linear = torch.ops.pf_kernels.context_linear.default
