"""The PyTorch reference of every op: plain, differentiable torch ops, the ground truth of every test.

Every op computes in fp32 (fp64 for fp64 inputs) and returns the input dtype, as the fused kernels do.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._validation import ACTIVATIONS  # noqa: F401  (re-exported: the one list of activations)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself where it already is (a no-op .to() is still a dispatcher call)."""
    return t if t.dtype == dtype else t.to(dtype)


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)  # exact erf form
    if activation == "tanh":
        return torch.tanh(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear_act(inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               activation: str) -> torch.Tensor:
    """act(inp @ weight.T + bias), accumulated in fp32, returned in inp's dtype."""
    acc = accumulate_dtype(inp.dtype)
    y = F.linear(_as(inp, acc), _as(weight, acc), None if bias is None else _as(bias, acc))
    return _as(apply_activation(y, activation), inp.dtype)


def backproj_concat(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, activation: str = "relu") -> torch.Tensor:
    """cat([x, act(z @ weight.T + bias) broadcast over x's positions], -1)."""
    context = linear_act(z, weight, bias, activation)
    positions = x.dim() - 2
    context = context.view(context.shape[0], *([1] * positions), context.shape[1])
    context = context.expand(*x.shape[:-1], context.shape[-1])
    return torch.cat([x, context], dim=-1)


def backproj_concat_grouped(xs: Sequence[torch.Tensor], z: torch.Tensor,
                            weights: Sequence[torch.Tensor],
                            biases: Optional[Sequence[Optional[torch.Tensor]]],
                            activation: str = "relu") -> List[torch.Tensor]:
    """One backproj_concat per modality, all reading the same z. biases=None: no bias anywhere."""
    biases = _per_modality(biases, len(xs))
    _same_lengths(xs=xs, weights=weights, biases=biases)
    return [backproj_concat(x, z, w, b, activation) for x, w, b in zip(xs, weights, biases)]


def _per_modality(biases: Optional[Sequence[Optional[torch.Tensor]]], k: int) -> Sequence[Optional[torch.Tensor]]:
    """None for no bias on any modality, as the public ops take it."""
    return [None] * k if biases is None else biases


def _same_lengths(**lists) -> None:
    """One entry per modality in every list (zip would drop the modalities past the shortest)."""
    lengths = {name: len(items) for name, items in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per modality expected, got lengths {lengths}")


def fusion_head(hs: Sequence[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None, activation: str = "relu") -> torch.Tensor:
    """act(cat(hs, -1) @ weight.T + bias)."""
    return linear_act(torch.cat(list(hs), dim=-1), weight, bias, activation)


def refine_step(hs: Sequence[torch.Tensor], head_weight: torch.Tensor,
                head_bias: Optional[torch.Tensor], xs: Sequence[torch.Tensor],
                bp_weights: Sequence[torch.Tensor], bp_biases: Optional[Sequence[Optional[torch.Tensor]]],
                head_activation: str = "relu", backproj_activation: str = "relu",
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The fusion head, then every modality's back-projection of its output, concatenated to xs.

    The back-projections read z as returned (in the input dtype), so refine_step equals
    fusion_head followed by backproj_concat exactly.
    """
    z = fusion_head(hs, head_weight, head_bias, head_activation)
    return z, backproj_concat_grouped(xs, z, bp_weights, bp_biases, backproj_activation)


def context_linear(p: torch.Tensor, z: torch.Tensor, bp_weight: torch.Tensor,
                   bp_bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
                   activation: str = "relu", out_activation: str = "none") -> torch.Tensor:
    """out_act(p + act(z @ bp_weight.T + bp_bias) @ proj_weight.T broadcast over p's positions).

    The encoder's first Linear applied to backproj_concat(x, z, bp_weight, bp_bias, activation),
    with p = x @ W_x.T + b computed once and proj_weight = W_c (the Linear's context columns).
    The context is rounded to p's dtype, as backproj_concat returns it; the projection, the sum
    and out_act are accumulated in fp32 and rounded once.
    """
    context = linear_act(z, bp_weight, bp_bias, activation)
    acc = accumulate_dtype(p.dtype)
    term = F.linear(_as(context, acc), _as(proj_weight, acc))
    term = term.view(term.shape[0], *([1] * (p.dim() - 2)), term.shape[1])
    return _as(apply_activation(_as(p, acc) + term, out_activation), p.dtype)


def refine_step_hoisted(hs: Sequence[torch.Tensor], head_weight: torch.Tensor,
                        head_bias: Optional[torch.Tensor], ps: Sequence[torch.Tensor],
                        bp_weights: Sequence[torch.Tensor], bp_biases: Optional[Sequence[Optional[torch.Tensor]]],
                        proj_weights: Sequence[torch.Tensor], head_activation: str = "relu",
                        backproj_activation: str = "relu", out_activations: Union[str, Sequence[str]] = "none",
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """A refinement step of encoders whose first Linears are hoisted: the fusion head, then every
    modality's context_linear reading its output (as refine_step's back-projections read it).
    out_activations: one for every modality, or one per modality."""
    if isinstance(out_activations, str):
        out_activations = [out_activations] * len(ps)
    bp_biases = _per_modality(bp_biases, len(ps))
    _same_lengths(ps=ps, bp_weights=bp_weights, bp_biases=bp_biases, proj_weights=proj_weights,
                  out_activations=out_activations)
    z = fusion_head(hs, head_weight, head_bias, head_activation)
    return z, [context_linear(p, z, w, b, pw, backproj_activation, a)
               for p, w, b, pw, a in zip(ps, bp_weights, bp_biases, proj_weights, out_activations)]
