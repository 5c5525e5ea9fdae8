"""The backward of a backward (a gradient penalty, a Hessian-vector product) for the triton ops, as
csrc/ops/differentiable_backward.h does for the C++ ones: a backward run in grad mode (autograd
turns it on for create_graph=True alone) recomputes its op's small parts from the saved inputs with
PyTorch ops, in fp32 for 16-bit inputs as the kernels accumulate, and takes their gradients with
autograd, which can differentiate them again. Every other backward runs the kernels."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..reference import apply_activation


def differentiated() -> bool:
    return torch.is_grad_enabled()


def without_autocast(t: torch.Tensor):
    """Held while recomputing: in the accumulation type also where the backward runs inside an
    autocast region, as the ops themselves compute."""
    return torch.autocast(t.device.type, enabled=False)


def fresh(*tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """New aliases of saved inputs, for the recomputation to read and the gradients to be taken for.
    Not the inputs themselves: their own history may hold another input (a weight an earlier step
    used to make z), and autograd.grad would add that path to the input's gradient, which autograd
    already follows."""
    return [t.view_as(t) if t is not None and t.requires_grad else t for t in tensors]


def wide(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t in its accumulation type; autograd casts its gradient back."""
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def sum_over_positions(grad: torch.Tensor) -> torch.Tensor:
    """(B, *S, D) -> (B, D): the gradient of a (B, D) tensor broadcast over the positions S."""
    return grad.sum(dim=tuple(range(1, grad.dim() - 1))) if grad.dim() > 2 else grad


def gradients(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
              inputs: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """The gradients of outputs (weighted by grad_outputs) for each input, themselves differentiable;
    None for an input that is None or does not require grad."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(list(outputs), wanted, list(grad_outputs), create_graph=True, allow_unused=True)
               if wanted else ())
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def context_of(z, weight, bias, activation: str) -> torch.Tensor:
    """act(z @ weight.T + bias), (B, Dc), of fresh inputs."""
    return apply_activation(F.linear(wide(z), wide(weight), wide(bias)), activation)


def head_of(hs: Sequence[torch.Tensor], weight, bias, activation: str):
    """(the concat of hs, act(concat @ weight.T + bias)), weight and bias fresh: the gradient is taken
    for the concat (a new tensor) and cut per input (split), so that a tensor passed twice in hs gets
    both parts, not the whole twice."""
    joined = torch.cat([wide(h) for h in hs], 1)
    return joined, apply_activation(F.linear(joined, wide(weight), wide(bias)), activation)


def split(grad_joined: Optional[torch.Tensor], hs: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    out, start = [], 0
    for h in hs:
        width = h.shape[1]
        out.append(grad_joined[:, start:start + width].to(h.dtype)
                   if grad_joined is not None and h.requires_grad else None)
        start += width
    return out


def context_linear_parts(grad_out, out, p, z, bp_weight, bp_bias, proj_weight, activation: str,
                         out_activation: str):
    """(output, its gradient, grad_p or None) for one context_linear, from what it saved: the output
    for relu, p for the other output activations, neither for none. Where p is saved, grad_p comes
    from `gradients` with the others (p is then among the inputs)."""
    term = F.linear(context_of(z, bp_weight, bp_bias, activation), wide(proj_weight))  # (B, H); inputs fresh
    if p is not None:
        shape = (term.shape[0], *[1] * (p.dim() - 2), term.shape[1])
        return apply_activation(wide(p) + term.reshape(shape), out_activation), wide(grad_out), None
    grad_p = torch.ops.aten.threshold_backward(grad_out, out, 0) if out_activation == "relu" else grad_out
    return term, sum_over_positions(wide(grad_p)), grad_p
