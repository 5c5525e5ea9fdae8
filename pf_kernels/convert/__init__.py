"""convert(model, backend): put the fused ops into a model users already have.

(a) Every pf_kernels.nn module in the model is switched to `backend`.
(b) The model's forward is captured as it really runs (torch.compile, capture.py) and the
    patterns (patterns.py) are swapped for the fused ops (rewrite.py): the late-fusion head
    act(linear(cat([h_1..h_K], -1))) becomes fusion_head, the back-projection
    cat([x, act(linear(z)) broadcast over x's positions], feature dim) becomes backproj_concat, and
    an encoder's first Linear over such a cat is hoisted (DESIGN §7): x's projection
    linear(x, W[:, :Dx], b) once per (x, Linear), shared by the unrolled steps, and context_linear
    per step (a step whose context is zeros is that projection alone).
The model stays the user's: same class, attributes, parameters, state_dict and methods; only the
instance's `forward` is the converted one. The report (report.py) lists every swap and every
cat/linear that looks like a pattern but was not swapped, with the reason.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .._dispatch import check_backend_name
from ..nn import BackProjection, FusionHead, ProgressiveFusion
from .capture import install, installed, run_example, uninstall
from .report import ConversionReport, Converted, count_fused_calls
from .rewrite import FusedCalls

__all__ = ["convert", "unconvert", "Converted", "ConversionReport", "count_fused_calls"]


def convert(model: nn.Module, backend: str = "auto", example_inputs: Optional[Any] = None,
            example_kwargs: Optional[Dict[str, Any]] = None) -> Converted:
    """Swap the fused ops into `model`, in place; returns (model, report).

    example_inputs: the positional arguments of one forward call, as a tuple (like torch.export's
    args): `(x1, x2)` for forward(self, x1, x2), `([x1, x2],)` for forward(self, inputs). With
    them the forward is captured now and the report is complete on return (the model's buffers and
    the RNG state are left as they were); without them the capture happens at the first call and
    the report fills in then. Calling convert() again on a converted model switches its backend
    without capturing it again; backend="torch" runs the same graph on the plain PyTorch ops.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, tuple):
            raise TypeError("example_inputs must be a tuple of forward's positional arguments, e.g. "
                            "example_inputs=([x1, x2],) for forward(self, inputs); got "
                            f"{type(example_inputs).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")

    converted = installed(model)
    report = converted.report if converted is not None else ConversionReport()
    for name, module in model.named_modules():
        if isinstance(module, (BackProjection, FusionHead)):
            module.backend = backend
            report.backends_set.append(f"{name or type(module).__name__}: {type(module).__name__} -> {backend!r}")
    if isinstance(model, (BackProjection, FusionHead, ProgressiveFusion)):
        return Converted(model, report)
    for name, module in model.named_modules():
        if name and installed(module) is not None:
            uninstall(module)  # the parent's capture covers it
            report.add_left_alone(f"{name}: its own earlier conversion is undone: the model's capture covers it")
    if converted is not None:
        converted.calls.backend = backend
        report.backends_set.append(f"{type(model).__name__}.forward: fused calls -> {backend!r}")
    else:
        install(model, FusedCalls(backend), report)
    if example_inputs is not None or example_kwargs is not None:
        run_example(model, example_inputs or (), example_kwargs or {})
    return Converted(model, report)


def unconvert(model: nn.Module) -> nn.Module:
    """Give `model` its own forward back (pf_kernels modules keep their backend)."""
    uninstall(model)
    return model
