"""The functional ops: validate once, pick the backend, call its implementation."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _validation as checks
from ._dispatch import get_impl, resolve_backend


def backproj_concat(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, activation: str = "relu",
                    backend: str = "auto") -> torch.Tensor:
    """Back-project z into a context and concatenate it to x over every position.

    x: (B, *S, Dx); z: (B, Dz); weight: (Dc, Dz); bias: (Dc,) or None.
    Returns (B, *S, Dx + Dc): out[..., :Dx] = x, out[b, s..., Dx:] = act(z[b] @ weight.T + bias).
    """
    checks.check_backproj_concat(x, z, weight, bias, activation)
    name = resolve_backend(backend, "backproj_concat", x.device, x.dtype)
    return get_impl(name, "backproj_concat")(x, z, weight, bias, activation)


def backproj_concat_grouped(xs: Sequence[torch.Tensor], z: torch.Tensor,
                            weights: Sequence[torch.Tensor],
                            biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                            activation: str = "relu", backend: str = "auto") -> List[torch.Tensor]:
    """backproj_concat for every modality (one x, weight, bias each) from one z, in one launch."""
    biases = checks.check_backproj_grouped(xs, z, weights, biases, activation)
    name = resolve_backend(backend, "backproj_concat_grouped", z.device, z.dtype)
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
    checks.check_fusion_head(hs, weight, bias, activation)
    name = resolve_backend(backend, "fusion_head", hs[0].device, hs[0].dtype)
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
    bp_biases = checks.check_refine_step(hs, head_weight, head_bias, xs, bp_weights, bp_biases,
                                         head_activation, backproj_activation)
    name = resolve_backend(backend, "refine_step", hs[0].device, hs[0].dtype)
    hs, xs, bp_weights = list(hs), list(xs), list(bp_weights)
    impl = get_impl(name, "refine_step")
    if impl is not None:
        z, xs_out = impl(hs, head_weight, head_bias, xs, bp_weights, bp_biases,
                         head_activation, backproj_activation)
        return z, list(xs_out)
    z = get_impl(name, "fusion_head")(hs, head_weight, head_bias, head_activation)
    return z, _grouped(name, xs, z, bp_weights, bp_biases, backproj_activation)
