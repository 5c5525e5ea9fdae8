"""The backend registry: which implementation of an op serves a call.

A backend is a name, the device types it serves and a loader. The loader imports the backend's
module on first use and returns it; the module defines the ops it implements (same signatures as
`pf_kernels.reference`, inputs already validated) and may define
`unsupported(op, device, dtype) -> Optional[str]` to refuse inputs it does not take.
A loader that raises makes the backend unavailable, with the error as the reason.

The backend is chosen here, before autograd records anything: each implementation is itself
differentiable (autograd is registered on its custom ops), never picked inside a backward.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

ENV_VAR = "PF_KERNELS_BACKEND"


def _env_reader():
    # os.environ.get costs ~1.4 us per call (it encodes the key; a missing key raises inside), more
    # than the rest of a memoised dispatch: read os.environ's own mapping with the key encoded once.
    data, encode, decode = (getattr(os.environ, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(ENV_VAR)
    key = encode(ENV_VAR)

    def read() -> Optional[str]:
        value = data.get(key)
        return None if value is None else decode(value)
    return read


env_backend = _env_reader()
OPS = ("backproj_concat", "backproj_concat_grouped", "fusion_head", "refine_step", "context_linear",
       "refine_step_hoisted")
# Ops that pf_kernels.ops composes from a backend's other ops where the backend lacks its own.
_COMPOSED = ("backproj_concat_grouped", "refine_step", "refine_step_hoisted")


@dataclass
class Backend:
    name: str
    device_types: Callable[[], Tuple[str, ...]]
    loader: Callable[[], object]
    description: str
    _module: object = None
    _error: Optional[str] = None
    _loaded: bool = field(default=False)

    def load(self):
        if not self._loaded:
            try:
                self._module = self.loader()
            except Exception as exc:  # any failure to load means: not available, and why
                self._error = f"{type(exc).__name__}: {exc}"
            self._loaded = True
        return self._module

    def unavailable_reason(self) -> Optional[str]:
        self.load()
        return self._error


_BACKENDS: Dict[str, Backend] = {}
# Where "auto" looks, in order, per device type and, where measurements differ, per op ("*": the
# rest); "torch" serves everything else. From the benchmarks (benchmarks/results/):
# - H100 (torch 2.11, triton 3.6; runs of 2026-11-26 and -27): cuda beat triton on every row, and
#   eager on every row but fusion_head at B=4096 (0.97-0.98x forward: the same cuBLAS GEMM; its
#   backward's fp32 GEMMs, since moved to the input dtype). triton lost to eager on every row,
#   0.14-0.8x (host-bound: 150-340 us of host time per forward call), so auto does not pick it:
#   without the cuda kernels (an install without nvcc), eager's ops serve. No size crossover: cuda
#   first for every op, size and dtype.
# - CPU: fusion_head's cpu kernel is one GEMM like eager's plus the op's call overhead: 0.92x eager
#   over the grid, so auto keeps eager's; refine_step then composes torch's head with the cpu
#   back-projections (pf_kernels.ops.refine_step).
_AUTO_ORDER = {
    "cuda": {"*": ("cuda", "torch")},
    "cpu": {"*": ("cpu", "torch"), "fusion_head": ("torch",)},
}


def register_backend(name: str, device_types: Callable[[], Tuple[str, ...]],
                     loader: Callable[[], object], description: str) -> None:
    _BACKENDS[name] = Backend(name, device_types, loader, description)


def _import(module_name: str) -> Callable[[], object]:
    return lambda: importlib.import_module(module_name)


def _triton_devices() -> Tuple[str, ...]:
    # Under the Triton interpreter, kernels run on CPU tensors (used by the tests).
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


register_backend("torch", lambda: ("*",), _import("pf_kernels.reference"),
                 "the PyTorch reference: plain ops, every device")
register_backend("cpu", lambda: ("cpu",), _import("pf_kernels._backend_cpu"),
                 "C++ kernels of pf_kernels._C (ATen, OpenMP) for CPU tensors")
register_backend("cuda", lambda: ("cuda",), _import("pf_kernels._backend_cuda"),
                 "CUDA C++ kernels of pf_kernels._C for CUDA tensors")
register_backend("triton", _triton_devices, _import("pf_kernels.triton"),
                 "Triton kernels for CUDA tensors (CPU tensors under TRITON_INTERPRET=1)")


def available_backends() -> Dict[str, dict]:
    """Each backend: whether this install has it, the devices it serves, and why it is missing."""
    report = {}
    for name, backend in _BACKENDS.items():
        reason = backend.unavailable_reason()
        report[name] = {"available": reason is None,
                        "devices": list(backend.device_types()),
                        "description": backend.description,
                        "reason": reason}
    return report


def _refusal(backend: Backend, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why `backend` cannot serve this call, or None if it can."""
    reason = backend.unavailable_reason()
    if reason is not None:
        return f"backend {backend.name!r} is not available: {reason}"
    devices = backend.device_types()
    if "*" not in devices and device.type not in devices:
        return f"backend {backend.name!r} serves {', '.join(devices)} tensors, not {device.type}"
    module = backend.load()
    if not hasattr(module, op) and op not in _COMPOSED:
        return f"backend {backend.name!r} does not implement {op}"
    unsupported = getattr(module, "unsupported", None)
    if unsupported is not None:
        why = unsupported(op, device, dtype)
        if why:
            return f"backend {backend.name!r} does not take this input: {why}"
    return None


_RESOLVED: Dict[tuple, str] = {}
_transform_active = torch._C._functorch.peek_interpreter_stack
_DIFFERENTIATING = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)

# Lists opened by benchmarks.proof.record_backend_choice: every resolved name is appended to each.
# resolve_backend's body is never traced (assume_constant_result), so opening one changes nothing a
# compiled graph guards on; replacing resolve_backend did (its code object is a guard).
_resolution_listeners: List[List[str]] = []


# Under torch.compile the choice is made once, at trace time, outside the graph: the first call
# may import a backend, which dynamo must not trace.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The name of the backend that serves `op` on tensors of this device and dtype."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    # Inside torch.func.grad / vmap / jacrev / jvp or forward_ad.dual_level(): the fused backends'
    # autograd (a C++ or a custom autograd.Function without vmap or jvp rules) cannot serve, the
    # plain ops can.
    transform = _transform_active()
    if backend == "auto" and (transform is not None or _forward_ad._current_level >= 0):
        name = "torch"
    else:
        if transform is not None and backend != "torch" and transform.key() in _DIFFERENTIATING:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run inside torch.func's grad, jacrev, vjp or "
                               f"jvp (its autograd is its kernels' own); use backend='torch', or 'auto', which "
                               f"serves such calls with it")
        # Memoised: what a backend serves does not change within a process, only the environment can
        # (TRITON_INTERPRET is read once: triton itself reads it when triton.language is imported).
        key = (backend, env_backend() if backend == "auto" else None, op, device, dtype)
        name = _RESOLVED.get(key)
        if name is None:
            name = _resolve(backend, op, device, dtype)
            _RESOLVED[key] = name
    for listener in _resolution_listeners:
        listener.append(name)
    return name


def _resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    source = "backend"
    if backend == "auto":
        backend = env_backend() or "auto"
        source = f"the environment variable {ENV_VAR}"
    if backend == "auto":
        order = _AUTO_ORDER.get(device.type, {})
        for name in order.get(op, order.get("*", ("torch",))):
            if _refusal(_BACKENDS[name], op, device, dtype) is None:
                return name
        return "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}")
    why = _refusal(_BACKENDS[backend], op, device, dtype)
    if why is not None:
        raise RuntimeError(f"{op} on {dtype} {device.type} tensors: {why} "
                           f"(asked for by {source}; backend='auto' picks one that can)")
    return backend


@torch.compiler.assume_constant_result
def implements(backend: str, op: str) -> bool:
    """Whether `backend` (for "auto": the backend the environment variable names, if any) has op.

    For callers that can compose a result another way (ProgressiveFusion without hoisting) instead
    of asking a backend for an op it lacks. "auto" always serves; an unknown or unavailable backend
    counts as serving, so that calling the op raises its own error saying why.
    """
    name = backend
    if name == "auto":
        name = env_backend() or "auto"
    if name == "auto" or name not in _BACKENDS:
        return True
    module = _BACKENDS[name].load()
    return module is None or hasattr(module, op) or op in _COMPOSED


def check_backend_name(backend) -> None:
    """Validates a backend name without resolving it (for modules, at construction)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}")


def get_impl(backend_name: str, op: str):
    """The backend's implementation of op, or None where the caller composes it from other ops."""
    return getattr(_BACKENDS[backend_name].load(), op, None)
