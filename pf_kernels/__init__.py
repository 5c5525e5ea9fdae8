"""pf_kernels: fused kernels for Progressive Fusion multimodal models (arXiv 2209.00302)."""
from ._dispatch import available_backends
from .ops import (backproj_concat, backproj_concat_grouped, context_linear, fusion_head, refine_step,
                  refine_step_hoisted)
from . import nn, reference
from .convert import ConversionReport, Converted, convert
from ._extension import load_if_usable, warn_if_unusable

warn_if_unusable()  # once, where the compiled kernels are not built or were built for another torch
load_if_usable()

__version__ = "0.1.0"

__all__ = ["available_backends", "backproj_concat", "backproj_concat_grouped", "fusion_head",
           "refine_step", "context_linear", "refine_step_hoisted", "convert", "Converted", "ConversionReport", "nn", "reference", "__version__"]
