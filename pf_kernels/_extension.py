"""Loads the compiled extension pf_kernels._C and registers what its ops need from Python:
the fake (meta) implementations used by torch.compile and opcheck. Autograd is registered in C++
(csrc/ops/), one node per call; the backward ops have their own device kernels.

Also says once, at import, when this install's compiled kernels cannot be used: not built, or built
against another torch (setup.py records which in pf_kernels/_build_info.py). Their backends are then
unavailable, saying why, and never loaded: a library built against another libtorch may not fail
cleanly."""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch

_loaded = False
_warned = False
# The dtypes the compiled kernels (cpu and cuda) are instantiated for:
# AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16) in csrc/.
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The fix, in every message: what builds _C against the torch that runs.
BUILD_COMMAND = "`pip install --no-build-isolation .` in pf_kernels' source (in a checkout: `make build`)"


class KernelsUnavailableWarning(UserWarning):
    """pf_kernels' compiled kernels cannot be used here: the cpu and cuda backends are unavailable."""


@functools.lru_cache(maxsize=None)
def build_problem() -> Optional[Tuple[str, str]]:
    """(kind, message) saying why pf_kernels._C cannot be used with this torch, found without loading
    it: kind "skipped" (a pure-Python install on purpose), "missing", "mismatch" or "static-runtime";
    None where nothing
    speaks against it (loading it then has the last word)."""
    try:
        from . import _build_info as info
    except ImportError:
        info = None  # a source tree built by hand or never built
    spec = importlib.util.find_spec(__package__ + "._C")
    built = spec is not None
    origin = getattr(spec, "origin", None)
    if built and origin and os.path.exists(origin):
        from ._elf import static_cxx_runtime
        if static_cxx_runtime(origin):
            return "static-runtime", (
                f"pf_kernels._C ({origin}) carries its own static copy of the C++ standard library, "
                "which crashes the process beside torch's on the first error message: its kernels are "
                "not loaded and only the torch and triton backends serve. Rebuild it with a compiler "
                f"that links libstdc++ dynamically (e.g. CXX=g++): {BUILD_COMMAND}.")
    if not built:
        if info is not None and info.EXTENSION == "skipped":
            return "skipped", ("pf_kernels was installed without its compiled kernels, on purpose "
                               "(PF_KERNELS_SKIP_EXTENSION=1 at build time): only the torch and triton "
                               f"backends serve. To have them: {BUILD_COMMAND}. PF_KERNELS_SKIP_EXTENSION=1 "
                               "at run time silences this warning.")
        return "missing", ("pf_kernels._C (the compiled cpu/cuda kernels) is not built: only the torch "
                           f"and triton backends serve. Build it against this torch: {BUILD_COMMAND}.")
    if info is None or info.EXTENSION != "built" or info.TORCH_VERSION is None:
        return None
    built_with = f"torch {info.TORCH_VERSION}" + (f" (CUDA {info.CUDA_VERSION})" if info.CUDA_VERSION else "")
    running = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    if (info.TORCH_VERSION.split("+")[0] != torch.__version__.split("+")[0]
            or (info.CUDA_VERSION is not None and info.CUDA_VERSION != torch.version.cuda)):
        return "mismatch", (f"pf_kernels._C was built against {built_with} but this is {running}: its "
                            "kernels are not loaded (the C++ ABI differs between torch versions) and "
                            "only the torch and triton backends serve. Rebuild it against this torch: "
                            f"{BUILD_COMMAND}.")
    return None


def unsupported(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The registry's hook (pf_kernels._dispatch) of both compiled backends: validation passes every
    floating dtype (float8 too), so the kernels' other dtypes go to the torch backend under auto."""
    if dtype not in DTYPES:
        return f"dtype {dtype} (the C++ kernels take float64, float32, float16 and bfloat16)"
    return None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, KernelsUnavailableWarning, stacklevel=3)


def warn_if_unusable() -> None:
    """Called at `import pf_kernels`: one warning where the compiled kernels cannot be used."""
    problem = build_problem()
    if problem is None:
        return
    kind, message = problem
    if kind in ("skipped", "missing") and os.environ.get("PF_KERNELS_SKIP_EXTENSION", "0").strip().lower() in (
            "1", "true", "yes", "on"):
        return  # the user runs without the kernels on purpose
    _warn_once(message)


def load_if_usable() -> None:
    """Called at `import pf_kernels`: registers the compiled ops (torch.ops.pf_kernels.*) where nothing
    speaks against loading them, so that a program saved with them (torch.export, TorchScript) loads in
    a process that only imported pf_kernels. Where they cannot load, the backends say why when asked."""
    if build_problem() is None:
        try:
            load()
        except ImportError:
            pass  # load() warned; the torch and triton backends serve


def load() -> None:
    """Imports pf_kernels._C once; raises ImportError saying why it cannot be used."""
    global _loaded
    if _loaded:
        return
    problem = build_problem()
    if problem is not None:
        raise ImportError(problem[1])
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.pf_kernels.*)
    except ImportError as exc:
        message = (f"pf_kernels._C does not load with torch {torch.__version__} ({exc}); rebuild it "
                   f"against this torch: {BUILD_COMMAND}")
        _warn_once(message)
        raise ImportError(message) from exc
    _register_fakes()
    _loaded = True


def _register_fakes() -> None:
    lib = "pf_kernels::"

    @torch.library.register_fake(lib + "backproj_concat")
    def _backproj_concat(x, z, weight, bias, activation):
        torch._check(x.dim() >= 2, lambda: f"x must be (B, *positions, Dx), got {tuple(x.shape)}")
        torch._check(z.dim() == 2 and z.shape[0] == x.shape[0], lambda: f"z must be (B, Dz), got {tuple(z.shape)}")
        torch._check(weight.dim() == 2 and weight.shape[1] == z.shape[1],
                     lambda: f"weight must be (Dc, {z.shape[1]}), got {tuple(weight.shape)}")
        return x.new_empty((*x.shape[:-1], x.shape[-1] + weight.shape[0]))

    @torch.library.register_fake(lib + "backproj_concat_backward")
    def _backproj_concat_backward(grad_out, context, z, weight, bias, activation, x_features):
        torch._check(grad_out.shape[-1] == x_features + weight.shape[0],
                     lambda: f"grad_out must have {x_features} + {weight.shape[0]} features")
        grad_bias = grad_out.new_empty(bias.shape if bias is not None else (0,))
        return z.new_empty(z.shape), weight.new_empty(weight.shape), grad_bias

    @torch.library.register_fake(lib + "fusion_head")
    def _fusion_head(hs, weight, bias, activation):
        torch._check(len(hs) >= 1, lambda: "hs must hold at least one tensor")
        torch._check(weight.shape[1] == sum(h.shape[1] for h in hs),
                     lambda: f"weight {tuple(weight.shape)} does not match the widths of hs")
        return hs[0].new_empty((hs[0].shape[0], weight.shape[0]))

    @torch.library.register_fake(lib + "fusion_head_backward")
    def _fusion_head_backward(grad_out, hs, weight, bias, out, activation):
        grad_bias = grad_out.new_empty(bias.shape if bias is not None else (0,))
        return [h.new_empty(h.shape) for h in hs], weight.new_empty(weight.shape), grad_bias

    @torch.library.register_fake(lib + "context_linear")
    def _context_linear(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation):
        torch._check(p.dim() >= 2, lambda: f"p must be (B, *positions, H), got {tuple(p.shape)}")
        torch._check(z.dim() == 2 and z.shape[0] == p.shape[0], lambda: f"z must be (B, Dz), got {tuple(z.shape)}")
        torch._check(bp_weight.dim() == 2 and bp_weight.shape[1] == z.shape[1],
                     lambda: f"bp_weight must be (Dc, {z.shape[1]}), got {tuple(bp_weight.shape)}")
        torch._check(proj_weight.dim() == 2 and proj_weight.shape[0] == p.shape[-1]
                     and proj_weight.shape[1] == bp_weight.shape[0],
                     lambda: f"proj_weight must be ({p.shape[-1]}, {bp_weight.shape[0]}), got {tuple(proj_weight.shape)}")
        return p.new_empty(p.shape)

    @torch.library.register_fake(lib + "context_linear_backward")
    def _context_linear_backward(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, activation, out_activation):
        # grad_p is empty without an output activation: p's gradient is grad_out itself.
        grad_p = grad_out.new_empty(grad_out.shape if out_activation != "none" else (0,))
        grad_bias = grad_out.new_empty(bp_bias.shape if bp_bias is not None else (0,))
        return (grad_p, z.new_empty(z.shape), bp_weight.new_empty(bp_weight.shape), grad_bias,
                proj_weight.new_empty(proj_weight.shape))
