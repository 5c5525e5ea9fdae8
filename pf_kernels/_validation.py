"""Input checks shared by every backend: each bad input gets an error naming the argument."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")


_ACTIVATION_SET = frozenset(ACTIVATIONS)
_Tensor = torch.Tensor
_STRIDED = torch.strided


# Fast paths: valid calls (nearly all of them) pass these few attribute checks and return; only
# a call that fails one runs the full checks below, which name the culprit. They cost ~1-2 us,
# which matters next to kernels of a few microseconds.
def _linear_ok(weight, bias, in_features, dtype, device) -> bool:
    if not isinstance(weight, _Tensor) or weight.dtype is not dtype or weight.device != device \
            or weight.layout is not _STRIDED:
        return False
    shape = weight.shape
    if len(shape) != 2 or shape[1] != in_features:
        return False
    return bias is None or (isinstance(bias, _Tensor) and bias.dtype is dtype and bias.device == device
                            and bias.layout is _STRIDED and bias.shape == shape[:1])


def _backproj_ok(x, z, weight, bias, activation) -> bool:
    if not _activation_ok(activation) or not isinstance(x, _Tensor) or not isinstance(z, _Tensor):
        return False
    dtype, device = x.dtype, x.device
    if z.layout is not _STRIDED:
        return False
    z_shape = z.shape
    if not dtype.is_floating_point or z.dtype is not dtype or z.device != device or len(z_shape) != 2:
        return False
    return _projection_ok(x, z_shape[0], z_shape[1], dtype, device, weight, bias)


def _projection_ok(x, batch, dz, dtype, device, weight, bias) -> bool:
    """x (batch, *positions, D) of this dtype and device, read with a back-projection (weight, bias)
    of a z (batch, dz)."""
    if not isinstance(x, _Tensor) or x.dtype is not dtype or x.device != device or x.layout is not _STRIDED:
        return False
    x_shape = x.shape
    return len(x_shape) >= 2 and x_shape[0] == batch and _linear_ok(weight, bias, dz, dtype, device)


def _activation_ok(activation) -> bool:
    return type(activation) is str and activation in _ACTIVATION_SET


def _proj_weight_ok(proj_weight, p, bp_weight) -> bool:
    """context_linear's proj_weight: (H, Dc), H from p, Dc from bp_weight, p's dtype and device."""
    if not isinstance(proj_weight, _Tensor) or proj_weight.dtype is not p.dtype or proj_weight.device != p.device \
            or proj_weight.layout is not _STRIDED:
        return False
    shape = proj_weight.shape
    return len(shape) == 2 and shape[0] == p.shape[-1] and shape[1] == bp_weight.shape[0]


def _per_modality_ok(items, n) -> bool:
    return (type(items) is list or type(items) is tuple) and len(items) == n


def _step_ok(hs, head_weight, head_bias, head_activation, backproj_activation, xs, bp_weights, bp_biases,
             hoisted=False, proj_weights=None, out_activations=None) -> bool:
    """refine_step's arguments, or refine_step_hoisted's (hoisted; xs being ps), all valid: what a
    valid call (nearly every call) costs to check, without building z."""
    if not _fusion_head_ok(hs, head_weight, head_bias, head_activation) \
            or not _activation_ok(backproj_activation) or (type(xs) is not list and type(xs) is not tuple) or not xs:
        return False
    n = len(xs)
    if not _per_modality_ok(bp_weights, n) or (bp_biases is not None and not _per_modality_ok(bp_biases, n)):
        return False
    if hoisted and not _per_modality_ok(proj_weights, n):
        return False
    one_out = type(out_activations) is str
    if hoisted and not one_out and not _per_modality_ok(out_activations, n):
        return False
    first = hs[0]
    dtype, device, batch, dz = first.dtype, first.device, first.shape[0], head_weight.shape[0]
    for j in range(n):
        x, weight = xs[j], bp_weights[j]
        if not _projection_ok(x, batch, dz, dtype, device, weight, None if bp_biases is None else bp_biases[j]):
            return False
        if hoisted and not (_activation_ok(out_activations if one_out else out_activations[j])
                            and _proj_weight_ok(proj_weights[j], x, weight)):
            return False
    return True


def _fusion_head_ok(hs, weight, bias, activation) -> bool:
    if not _activation_ok(activation) or (type(hs) is not list and type(hs) is not tuple) or not hs or not isinstance(hs[0], _Tensor):
        return False
    first = hs[0]
    if first.layout is not _STRIDED:
        return False
    dtype, device, shape = first.dtype, first.device, first.shape
    if not dtype.is_floating_point or len(shape) != 2:
        return False
    batch, in_features = shape
    for h in hs[1:]:
        if not isinstance(h, _Tensor) or h.dtype is not dtype or h.device != device or h.layout is not _STRIDED:
            return False
        shape = h.shape
        if len(shape) != 2 or shape[0] != batch:
            return False
        in_features += shape[1]
    return _linear_ok(weight, bias, in_features, dtype, device)


def _context_linear_ok(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation) -> bool:
    return _activation_ok(out_activation) and _backproj_ok(p, z, bp_weight, bp_bias, activation) \
        and _proj_weight_ok(proj_weight, p, bp_weight)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_activation(activation, name: str = "activation") -> None:
    if not isinstance(activation, str):
        raise TypeError(f"{name} must be a str, one of {ACTIVATIONS}; got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {activation!r}")


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout is not _STRIDED:
        raise TypeError(f"{name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


def check_same_dtype_device(named: Sequence, what: str) -> None:
    """All (name, tensor) pairs share one dtype and one device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{what}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "all tensors must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{what}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def _check_linear(weight, bias, in_features: int, in_name: str, weight_name: str,
                  bias_name: str, what: str) -> List:
    check_tensor(weight, weight_name)
    if weight.dim() != 2:
        raise ValueError(f"{what}: {weight_name} must be 2-D (out_features, in_features), "
                         f"got {_describe(weight)}")
    if weight.shape[1] != in_features:
        raise ValueError(f"{what}: {weight_name} has in_features {weight.shape[1]} "
                         f"({_describe(weight)}) but {in_name} has {in_features} features")
    named = [(weight_name, weight)]
    if bias is not None:
        check_tensor(bias, bias_name)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{what}: {bias_name} must have shape ({weight.shape[0]},) to match "
                             f"{weight_name} {tuple(weight.shape)}, got {_describe(bias)}")
        named.append((bias_name, bias))
    return named


def _check_sequence(seq, name: str, what: str) -> list:
    if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
        raise TypeError(f"{what}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(seq) == 0:
        raise ValueError(f"{what}: {name} must hold at least one tensor, got an empty {type(seq).__name__}")
    return list(seq)


def check_backproj_concat(x, z, weight, bias, activation, what: str = "backproj_concat",
                          x_name: str = "x", weight_name: str = "weight", bias_name: str = "bias",
                          z_name: str = "z", activation_name: str = "activation") -> None:
    try:
        if _backproj_ok(x, z, weight, bias, activation):
            return
    except RuntimeError:  # a nested tensor has no sizes: the checks below name it
        pass
    check_tensor(x, x_name)
    check_tensor(z, z_name)
    if x.dim() < 2:
        raise ValueError(f"{what}: {x_name} must be (B, *positions, Dx) with at least 2 dims, "
                         f"got {_describe(x)}")
    if z.dim() != 2:
        raise ValueError(f"{what}: {z_name} must be 2-D (B, Dz), got {_describe(z)}")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"{what}: batch sizes differ: {x_name} {tuple(x.shape)} vs {z_name} {tuple(z.shape)}")
    named = [(x_name, x), (z_name, z)]
    named += _check_linear(weight, bias, z.shape[1], z_name, weight_name, bias_name, what)
    check_same_dtype_device(named, what)
    check_activation(activation, activation_name)


def _check_hs(hs, what: str) -> List[torch.Tensor]:
    hs = _check_sequence(hs, "hs", what)
    for j, h in enumerate(hs):
        check_tensor(h, f"hs[{j}]")
        if h.dim() != 2:
            raise ValueError(f"{what}: hs[{j}] must be 2-D (B, D_{j}), got {_describe(h)}")
        if h.shape[0] != hs[0].shape[0]:
            raise ValueError(f"{what}: batch sizes differ: hs[0] {tuple(hs[0].shape)} vs "
                             f"hs[{j}] {tuple(h.shape)}")
    return hs


def check_fusion_head(hs, weight, bias, activation, what: str = "fusion_head",
                      weight_name: str = "weight", bias_name: str = "bias",
                      activation_name: str = "activation") -> None:
    try:
        if _fusion_head_ok(hs, weight, bias, activation):
            return
    except RuntimeError:  # a nested tensor has no sizes: the checks below name it
        pass
    hs = _check_hs(hs, what)
    in_features = sum(h.shape[1] for h in hs)
    widths = "+".join(str(h.shape[1]) for h in hs)
    named = [(f"hs[{j}]", h) for j, h in enumerate(hs)]
    named += _check_linear(weight, bias, in_features, f"cat(hs) ({widths})", weight_name, bias_name, what)
    check_same_dtype_device(named, what)
    check_activation(activation, activation_name)


def _bias_list(biases, name: str, n: int, what: str) -> list:
    """A per-modality bias argument as a list: None means no bias for any of the n modalities."""
    if biases is None:
        return [None] * n
    if isinstance(biases, torch.Tensor) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"{what}: {name} must be None or a list of tensors/None, got {type(biases).__name__}")
    return list(biases)


def check_backproj_grouped(xs, z, weights, biases, activation, what: str = "backproj_concat_grouped",
                           weights_name: str = "weights", biases_name: str = "biases", z_name: str = "z",
                           activation_name: str = "activation") -> List[Optional[torch.Tensor]]:
    """Checks the per-modality lists; returns biases as a list (None -> all None)."""
    xs = _check_sequence(xs, "xs", what)
    weights = _check_sequence(weights, weights_name, what)
    biases = _bias_list(biases, biases_name, len(xs), what)
    if not len(xs) == len(weights) == len(biases):
        raise ValueError(f"{what}: one entry of xs, {weights_name} and {biases_name} per modality: got "
                         f"{len(xs)} xs, {len(weights)} {weights_name}, {len(biases)} {biases_name}")
    for j, (x, w, b) in enumerate(zip(xs, weights, biases)):
        check_backproj_concat(x, z, w, b, activation, what, f"xs[{j}]", f"{weights_name}[{j}]",
                              f"{biases_name}[{j}]", z_name, activation_name)
    check_same_dtype_device([(z_name, z)] + [(f"xs[{j}]", x) for j, x in enumerate(xs)], what)
    return biases


# What a step's back-projections read: the head's output, which the caller never passes.
_HEAD_OUTPUT = "z = fusion_head(hs) (B from hs[0], Dz from head_weight)"


def _step_inputs(hs, head_weight, xs, xs_name: str, what: str):
    """A step's per-modality inputs checked against hs[0] (whose dtype and device z takes), and a
    stand-in for z: zero strides, z's shape, dtype and device. Call after check_fusion_head."""
    xs = _check_sequence(xs, xs_name, what)
    for j, x in enumerate(xs):
        check_tensor(x, f"{xs_name}[{j}]")
    check_same_dtype_device([("hs[0]", hs[0])] + [(f"{xs_name}[{j}]", x) for j, x in enumerate(xs)], what)
    return xs, hs[0].new_empty(()).expand(hs[0].shape[0], head_weight.shape[0])


def check_refine_step(hs, head_weight, head_bias, xs, bp_weights, bp_biases,
                      head_activation, backproj_activation) -> List[Optional[torch.Tensor]]:
    """Checks the head and the back-projections; returns bp_biases as a list."""
    what = "refine_step"
    try:
        if _step_ok(hs, head_weight, head_bias, head_activation, backproj_activation, xs, bp_weights, bp_biases):
            return [None] * len(xs) if bp_biases is None else list(bp_biases)
    except RuntimeError:  # a nested tensor has no sizes: the checks below name it
        pass
    check_fusion_head(hs, head_weight, head_bias, head_activation, what,
                      "head_weight", "head_bias", "head_activation")
    xs, z_like = _step_inputs(hs, head_weight, xs, "xs", what)
    return check_backproj_grouped(xs, z_like, bp_weights, bp_biases, backproj_activation, what,
                                  "bp_weights", "bp_biases", _HEAD_OUTPUT, "backproj_activation")


def check_context_linear(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation,
                         what: str = "context_linear", p_name: str = "p", bp_weight_name: str = "bp_weight",
                         bp_bias_name: str = "bp_bias", proj_weight_name: str = "proj_weight",
                         out_activation_name: str = "out_activation", z_name: str = "z",
                         activation_name: str = "activation") -> None:
    try:
        if _context_linear_ok(p, z, bp_weight, bp_bias, proj_weight, activation, out_activation):
            return
    except RuntimeError:  # a nested tensor has no sizes: the checks below name it
        pass
    check_tensor(p, p_name)
    if p.dim() < 2:
        raise ValueError(f"{what}: {p_name} must be (B, *positions, H) with at least 2 dims, got {_describe(p)}")
    check_backproj_concat(p, z, bp_weight, bp_bias, activation, what, p_name, bp_weight_name, bp_bias_name,
                          z_name, activation_name)
    check_tensor(proj_weight, proj_weight_name)
    H, Dc = p.shape[-1], bp_weight.shape[0]
    if proj_weight.dim() != 2 or proj_weight.shape[0] != H or proj_weight.shape[1] != Dc:
        raise ValueError(f"{what}: {proj_weight_name} must be (H, Dc) = ({H}, {Dc}): H from {p_name} "
                         f"{tuple(p.shape)}, Dc from {bp_weight_name} {tuple(bp_weight.shape)}; "
                         f"got {_describe(proj_weight)}")
    check_same_dtype_device([(p_name, p), (proj_weight_name, proj_weight)], what)
    check_activation(out_activation, out_activation_name)


def check_refine_step_hoisted(hs, head_weight, head_bias, ps, bp_weights, bp_biases, proj_weights,
                              head_activation, backproj_activation, out_activations):
    """Checks the head and every modality's context_linear; returns (bp_biases, out_activations)
    as lists (None -> all None; one str -> that str for every modality)."""
    what = "refine_step_hoisted"
    try:
        if _step_ok(hs, head_weight, head_bias, head_activation, backproj_activation, ps, bp_weights, bp_biases,
                    True, proj_weights, out_activations):
            n = len(ps)
            return ([None] * n if bp_biases is None else list(bp_biases),
                    [out_activations] * n if isinstance(out_activations, str) else list(out_activations))
    except RuntimeError:  # a nested tensor has no sizes: the checks below name it
        pass
    check_fusion_head(hs, head_weight, head_bias, head_activation, what,
                      "head_weight", "head_bias", "head_activation")
    ps, z_like = _step_inputs(hs, head_weight, ps, "ps", what)
    bp_weights = _check_sequence(bp_weights, "bp_weights", what)
    proj_weights = _check_sequence(proj_weights, "proj_weights", what)
    bp_biases = _bias_list(bp_biases, "bp_biases", len(ps), what)
    if isinstance(out_activations, str):
        out_activations = [out_activations] * len(ps)
    elif not isinstance(out_activations, (list, tuple)):
        raise TypeError(f"{what}: out_activations must be a str or a list of str, got "
                        f"{type(out_activations).__name__}")
    out_activations = list(out_activations)
    if not len(ps) == len(bp_weights) == len(bp_biases) == len(proj_weights) == len(out_activations):
        raise ValueError(f"{what}: one p, bp_weight, bp_bias, proj_weight and out_activation per modality: "
                         f"got {len(ps)} ps, {len(bp_weights)} bp_weights, {len(bp_biases)} bp_biases, "
                         f"{len(proj_weights)} proj_weights, {len(out_activations)} out_activations")
    for j, (p, w, b, pw, a) in enumerate(zip(ps, bp_weights, bp_biases, proj_weights, out_activations)):
        check_context_linear(p, z_like, w, b, pw, backproj_activation, a, what, f"ps[{j}]", f"bp_weights[{j}]",
                             f"bp_biases[{j}]", f"proj_weights[{j}]", f"out_activations[{j}]", _HEAD_OUTPUT,
                             "backproj_activation")
    return bp_biases, out_activations
