"""The cuda backend: the CUDA C++ kernels of pf_kernels._C on CUDA tensors."""
import torch

from ._extension import load, unsupported  # noqa: F401  (the dtypes the kernels take)

load()
if not torch._C._dispatch_has_kernel_for_dispatch_key("pf_kernels::backproj_concat", "CUDA"):
    raise ImportError("pf_kernels._C was built without its CUDA kernels (no CUDA toolkit or CPU-only torch "
                      "at build time; set PF_KERNELS_FORCE_CUDA=1 to insist)")
if not torch.cuda.is_available():
    raise ImportError("no CUDA device is visible to torch")

backproj_concat = torch.ops.pf_kernels.backproj_concat.default
fusion_head = torch.ops.pf_kernels.fusion_head.default
context_linear = torch.ops.pf_kernels.context_linear.default
