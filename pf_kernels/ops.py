"""The functional ops: validate once, pick the backend, call its implementation.

Under torch.autocast every op is a lower-precision op, as nn.Linear is: its floating inputs
(fp64 excepted, as autocast does) are cast to the autocast dtype of their device type, the op
computes in that dtype with fp32 accumulation, and autograd returns each input's gradient in that
input's own dtype (through the cast). The cast is plain Python before the op, so torch.compile
records it in the graph.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _validation as checks
from ._dispatch import env_backend, get_impl, resolve_backend

_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
_any_autocast = torch._C._is_any_autocast_enabled
_is_compiling = torch.compiler.is_compiling


def _autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype autocast asks of a matmul on t's device, or None where autocast is off there."""
    # One C call answers for nearly every eager call (~0.2 us, where t.device.type alone is ~0.5 us);
    # under torch.compile the per-device query below is what dynamo folds into a guard.
    if not _is_compiling() and not _any_autocast():
        return None
    if not isinstance(t, torch.Tensor):
        return None  # validation names the bad argument
    device_type = t.device.type
    if device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype \
            and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _cast_all(items, dtype: torch.dtype):
    if isinstance(items, (list, tuple)):
        return [_cast(t, dtype) for t in items]
    return items  # not a sequence: validation names it


_NO_CONTEXT = contextlib.nullcontext()  # reusable: nothing to build per call

# The eager entry points of pf_kernels._C (csrc/ops/eager.cpp): backend="auto" on CPU and CUDA
# tensors without the ~15 us of Python below (checks, backend choice, autocast), which is as much as
# a small op itself. Each returns None for a call it does not serve (anything but plain, valid tensors
# with nothing to honour: autocast, a torch function mode, a transform), which then takes the
# Python path; so does every call while PF_KERNELS_BACKEND is set. Never under torch.compile, which
# traces the Python path. None: not probed yet; False: this install has no loadable _C.
_eager = None


def _eager_ops():
    global _eager
    if _eager is None:
        from ._extension import load
        try:
            load()
            from . import _C
            _eager = _C
        except ImportError:  # not built, or for another torch: the Python path serves (and said why)
            _eager = False
    return _eager


# The open count_fused_calls() counters (pf_kernels.convert.report). Read only outside torch.compile's
# tracing: opening one changes nothing a captured graph depends on (replacing the ops did, so a
# converted model was captured again, and dynamo replayed its traced copy of the counter).
_fused_call_counters: tuple = ()


def _count_call(name: str, times: int = 1) -> None:
    if not _is_compiling() and _fused_call_counters:
        for counter in _fused_call_counters:
            counter[name] += times


def _modalities(items) -> int:
    return len(items) if isinstance(items, (list, tuple)) else 1


def _eager_for(backend):
    """The eager entry points where a call with this backend may take them, else None."""
    if backend == "auto" and not _is_compiling() and env_backend() is None and _forward_ad._current_level < 0:
        return _eager or _eager_ops() or None
    return None


def _autocast_off(backend_name: str, device: torch.device, cast: Optional[torch.dtype]):
    # The reference's fp32 matmuls would be recast by autocast; the compiled kernels keep autocast
    # out of their own ATen calls themselves (and a context manager costs ~15 us).
    if cast is not None and backend_name == "torch":
        return torch.autocast(device.type, enabled=False)
    return _NO_CONTEXT


def backproj_concat(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, activation: str = "relu",
                    backend: str = "auto") -> torch.Tensor:
    """Back-project z into a context and concatenate it to x over every position.

    x: (B, *S, Dx); z: (B, Dz); weight: (Dc, Dz); bias: (Dc,) or None.
    Returns (B, *S, Dx + Dc): out[..., :Dx] = x, out[b, s..., Dx:] = act(z[b] @ weight.T + bias).
    """
    _count_call("backproj_concat")
    eager = _eager_for(backend)
    if eager is not None:
        out = eager.backproj_concat(x, z, weight, bias, activation)
        if out is not None:
            return out
    cast = _autocast_dtype(x)
    if cast is not None:
        x, z, weight, bias = (_cast(t, cast) for t in (x, z, weight, bias))
    checks.check_backproj_concat(x, z, weight, bias, activation)
    name = resolve_backend(backend, "backproj_concat", x.device, x.dtype)
    with _autocast_off(name, x.device, cast):
        return get_impl(name, "backproj_concat")(x, z, weight, bias, activation)


def backproj_concat_grouped(xs: Sequence[torch.Tensor], z: torch.Tensor,
                            weights: Sequence[torch.Tensor],
                            biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                            activation: str = "relu", backend: str = "auto") -> List[torch.Tensor]:
    """backproj_concat for every modality (one x, weight, bias each) from one z, in one launch."""
    _count_call("backproj_concat", _modalities(xs))
    eager = _eager_for(backend)
    if eager is not None:
        outs = eager.backproj_concat_grouped(xs, z, weights, biases, activation)
        if outs is not None:
            return outs
    cast = _autocast_dtype(z)
    if cast is not None:
        z, xs, weights = _cast(z, cast), _cast_all(xs, cast), _cast_all(weights, cast)
        biases = _cast_all(biases, cast)
    biases = checks.check_backproj_grouped(xs, z, weights, biases, activation)
    name = resolve_backend(backend, "backproj_concat_grouped", z.device, z.dtype)
    with _autocast_off(name, z.device, cast):
        return _grouped(name, list(xs), z, list(weights), biases, activation)


def _grouped(name, xs, z, weights, biases, activation) -> List[torch.Tensor]:
    impl = get_impl(name, "backproj_concat_grouped")
    if impl is not None:
        return list(impl(xs, z, weights, biases, activation))
    single = get_impl(name, "backproj_concat")
    return [single(x, z, w, b, activation) for x, w, b in zip(xs, weights, biases)]


def fusion_head(hs: Sequence[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None, activation: str = "relu",
                backend: str = "auto") -> torch.Tensor:
    """Late-fusion head act(cat(hs, -1) @ weight.T + bias), without materialising the concat.

    hs: K >= 1 tensors (B, D_j); weight: (Dz, sum D_j); bias: (Dz,) or None. Returns (B, Dz).
    """
    _count_call("fusion_head")
    eager = _eager_for(backend)
    if eager is not None:
        out = eager.fusion_head(hs, weight, bias, activation)
        if out is not None:
            return out
    cast = _autocast_dtype(weight)
    if cast is not None:
        hs, weight, bias = _cast_all(hs, cast), _cast(weight, cast), _cast(bias, cast)
    checks.check_fusion_head(hs, weight, bias, activation)
    name = resolve_backend(backend, "fusion_head", hs[0].device, hs[0].dtype)
    with _autocast_off(name, hs[0].device, cast):
        return get_impl(name, "fusion_head")(list(hs), weight, bias, activation)


def refine_step(hs: Sequence[torch.Tensor], head_weight: torch.Tensor,
                head_bias: Optional[torch.Tensor], xs: Sequence[torch.Tensor],
                bp_weights: Sequence[torch.Tensor],
                bp_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                head_activation: str = "relu", backproj_activation: str = "relu",
                backend: str = "auto") -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One refinement step between the encoders: z = fusion_head(hs), then every x~_j.

    Returns (z, [backproj_concat(x_j, z, bp_weights[j], bp_biases[j]) for each modality j]).
    """
    _count_call("fusion_head")
    _count_call("backproj_concat", _modalities(xs))
    eager = _eager_for(backend)
    if eager is not None:
        out = eager.refine_step(hs, head_weight, head_bias, xs, bp_weights, bp_biases, head_activation,
                                backproj_activation)
        if out is not None:
            return out
    cast = _autocast_dtype(head_weight)
    if cast is not None:
        hs, xs, bp_weights = _cast_all(hs, cast), _cast_all(xs, cast), _cast_all(bp_weights, cast)
        head_weight, head_bias = _cast(head_weight, cast), _cast(head_bias, cast)
        bp_biases = _cast_all(bp_biases, cast)
    bp_biases = checks.check_refine_step(hs, head_weight, head_bias, xs, bp_weights, bp_biases,
                                         head_activation, backproj_activation)
    device, dtype = hs[0].device, hs[0].dtype
    name = resolve_backend(backend, "refine_step", device, dtype)
    hs, xs, bp_weights = list(hs), list(xs), list(bp_weights)
    impl = get_impl(name, "refine_step")
    if impl is not None:
        with _autocast_off(name, device, cast):
            z, xs_out = impl(hs, head_weight, head_bias, xs, bp_weights, bp_biases,
                             head_activation, backproj_activation)
        return z, list(xs_out)
    # Composed from the backend's other ops; under "auto", from whichever backend auto picks for each.
    head = name if backend != "auto" else resolve_backend(backend, "fusion_head", device, dtype)
    with _autocast_off(head, device, cast):
        z = get_impl(head, "fusion_head")(hs, head_weight, head_bias, head_activation)
    bp = name if backend != "auto" else resolve_backend(backend, "backproj_concat_grouped", device, dtype)
    with _autocast_off(bp, device, cast):
        return z, _grouped(bp, xs, z, bp_weights, bp_biases, backproj_activation)


def refine_step_hoisted(hs: Sequence[torch.Tensor], head_weight: torch.Tensor,
                        head_bias: Optional[torch.Tensor], ps: Sequence[torch.Tensor],
                        bp_weights: Sequence[torch.Tensor],
                        bp_biases: Optional[Sequence[Optional[torch.Tensor]]],
                        proj_weights: Sequence[torch.Tensor], head_activation: str = "relu",
                        backproj_activation: str = "relu", out_activations="none",
                        backend: str = "auto") -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One refinement step of encoders whose first Linears are hoisted (DESIGN §7): z =
    fusion_head(hs), then every modality's context_linear(ps[j], z, bp_weights[j], bp_biases[j],
    proj_weights[j], backproj_activation, out_activations[j]); one launch on the triton backend.

    out_activations: one str for every modality, or one per modality. Returns (z, [out_j]).
    """
    _count_call("fusion_head")
    _count_call("context_linear", _modalities(ps))
    eager = _eager_for(backend)
    if eager is not None:
        out = eager.refine_step_hoisted(hs, head_weight, head_bias, ps, bp_weights, bp_biases, proj_weights,
                                        head_activation, backproj_activation, out_activations)
        if out is not None:
            return out
    cast = _autocast_dtype(head_weight)
    if cast is not None:
        hs, ps = _cast_all(hs, cast), _cast_all(ps, cast)
        bp_weights, proj_weights = _cast_all(bp_weights, cast), _cast_all(proj_weights, cast)
        head_weight, head_bias = _cast(head_weight, cast), _cast(head_bias, cast)
        bp_biases = _cast_all(bp_biases, cast)
    bp_biases, out_activations = checks.check_refine_step_hoisted(
        hs, head_weight, head_bias, ps, bp_weights, bp_biases, proj_weights, head_activation,
        backproj_activation, out_activations)
    device, dtype = hs[0].device, hs[0].dtype
    name = resolve_backend(backend, "refine_step_hoisted", device, dtype)
    hs, ps, bp_weights, proj_weights = list(hs), list(ps), list(bp_weights), list(proj_weights)
    impl = get_impl(name, "refine_step_hoisted")
    if impl is not None:
        with _autocast_off(name, device, cast):
            z, outs = impl(hs, head_weight, head_bias, ps, bp_weights, bp_biases, proj_weights,
                           head_activation, backproj_activation, out_activations)
        return z, list(outs)
    # Composed from the backend's other ops; under "auto", from whichever backend auto picks for each.
    head = name if backend != "auto" else resolve_backend(backend, "fusion_head", device, dtype)
    with _autocast_off(head, device, cast):
        z = get_impl(head, "fusion_head")(hs, head_weight, head_bias, head_activation)
    each = name if backend != "auto" else resolve_backend(backend, "context_linear", device, dtype)
    context = get_impl(each, "context_linear")
    if context is None:
        raise RuntimeError(f"refine_step_hoisted: backend {each!r} implements neither it nor context_linear")
    with _autocast_off(each, device, cast):
        return z, [context(p, z, w, b, pw, backproj_activation, a)
                   for p, w, b, pw, a in zip(ps, bp_weights, bp_biases, proj_weights, out_activations)]


def context_linear(p: torch.Tensor, z: torch.Tensor, bp_weight: torch.Tensor,
                   bp_bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
                   activation: str = "relu", out_activation: str = "none",
                   backend: str = "auto") -> torch.Tensor:
    """A hoisted refinement step's first layer: out_act(p + act(z @ bp_weight.T + bp_bias) @ proj_weight.T),
    the (B, H) context term broadcast over p's positions.

    p: (B, *S, H), the encoder's first Linear applied to x alone (x @ W_x.T + b, computed once per
    forward); z: (B, Dz); bp_weight: (Dc, Dz), bp_bias: (Dc,) or None (the back-projection);
    proj_weight: (H, Dc), the Linear's context columns W_c. Equals that Linear applied to
    backproj_concat(x, z, bp_weight, bp_bias, activation), then out_activation, up to rounding.
    """
    _count_call("context_linear")
    eager = _eager_for(backend)
    if eager is not None:
        out = eager.context_linear(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation)
        if out is not None:
            return out
    cast = _autocast_dtype(p)
    if cast is not None:
        p, z, bp_weight, bp_bias, proj_weight = (_cast(t, cast) for t in (p, z, bp_weight, bp_bias, proj_weight))
    checks.check_context_linear(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation)
    name = resolve_backend(backend, "context_linear", p.device, p.dtype)
    with _autocast_off(name, p.device, cast):
        return get_impl(name, "context_linear")(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation)
