"""Drop-in modules. Parameters are named and laid out as nn.Linear's, so state_dicts are shared
between backends and with the plain-PyTorch modules they replace."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from ._dispatch import check_backend_name
from ._validation import check_activation


class _LinearParams(nn.Module):
    """weight (out, in) and optional bias (out,), initialised exactly as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, activation: str, bias: bool,
                 backend: str, device=None, dtype=None):
        super().__init__()
        check_activation(activation)
        check_backend_name(backend)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)


class BackProjection(_LinearParams):
    """x~ = cat([x, act(z @ weight.T + bias) over every position of x], -1).

    Parameters as nn.Linear(fused_dim, context_dim). forward(x: (B, *S, Dx), z: (B, fused_dim))
    returns (B, *S, Dx + context_dim).
    """

    def __init__(self, fused_dim: int, context_dim: int, activation: str = "relu", bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(fused_dim, context_dim, activation, bias, backend, device, dtype)

    @property
    def fused_dim(self) -> int:
        return self.in_features

    @property
    def context_dim(self) -> int:
        return self.out_features

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.backproj_concat(x, z, self.weight, self.bias, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"fused_dim={self.in_features}, context_dim={self.out_features}, "
                f"activation={self.activation!r}, bias={self.bias is not None}, backend={self.backend!r}")


class FusionHead(_LinearParams):
    """z = act(cat(hs, -1) @ weight.T + bias). Parameters as nn.Linear(sum(in_dims), out_dim)."""

    def __init__(self, in_dims: Sequence[int], out_dim: int, activation: str = "relu", bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        in_dims = [int(d) for d in in_dims]
        if not in_dims or any(d < 1 for d in in_dims):
            raise ValueError(f"in_dims must be a non-empty list of positive ints, got {in_dims}")
        super().__init__(sum(in_dims), out_dim, activation, bias, backend, device, dtype)
        self.in_dims = in_dims

    def forward(self, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(hs, (list, tuple)) and len(hs) != len(self.in_dims):
            raise ValueError(f"FusionHead expects {len(self.in_dims)} inputs (in_dims={self.in_dims}), "
                             f"got {len(hs)}")
        if isinstance(hs, (list, tuple)):
            for j, (h, d) in enumerate(zip(hs, self.in_dims)):
                if isinstance(h, torch.Tensor) and h.dim() == 2 and h.shape[1] != d:
                    raise ValueError(f"FusionHead: hs[{j}] has {h.shape[1]} features "
                                     f"({tuple(h.shape)}), in_dims[{j}] = {d}")
        return ops.fusion_head(hs, self.weight, self.bias, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_dims={self.in_dims}, out_dim={self.out_features}, activation={self.activation!r}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class ProgressiveFusion(nn.Module):
    """Progressive Fusion (Shankar et al., arXiv 2209.00302) around any K encoders.

    encoders[j] takes modality j's input with context_dims[j] extra features (last dim) and returns
    (B, encoder_dims[j]). The context starts at zero; each of the `iterations` steps runs the
    encoders and fuses, and every step but the last back-projects the fused vector z into each
    modality's input (broadcast over its positions) for the next. forward(xs) returns z_R, or the
    list [z_1..z_R] with return_all_steps=True.
    """

    def __init__(self, encoders: Sequence[nn.Module], encoder_dims: Sequence[int], fused_dim: int,
                 context_dims: Union[int, Sequence[int]], iterations: int = 2,
                 fusion_activation: str = "relu", context_activation: str = "relu", bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        encoders = list(encoders)
        if not encoders:
            raise ValueError("encoders must hold at least one module")
        if len(encoder_dims) != len(encoders):
            raise ValueError(f"encoder_dims has {len(encoder_dims)} entries for {len(encoders)} encoders")
        if isinstance(context_dims, int):
            context_dims = [context_dims] * len(encoders)
        context_dims = [int(c) for c in context_dims]
        if len(context_dims) != len(encoders):
            raise ValueError(f"context_dims has {len(context_dims)} entries for {len(encoders)} encoders")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        self.iterations = iterations
        self.context_dims = context_dims
        self.encoders = nn.ModuleList(encoders)
        self.fusion_head = FusionHead(encoder_dims, fused_dim, fusion_activation, bias, backend,
                                      device, dtype)
        self.back_projections = nn.ModuleList(
            BackProjection(fused_dim, c, context_activation, bias, backend, device, dtype)
            for c in context_dims)

    @property
    def backend(self) -> str:
        return self.fusion_head.backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend_name(value)
        for module in (self.fusion_head, *self.back_projections):
            module.backend = value

    def _check_inputs(self, xs) -> List[torch.Tensor]:
        if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs must be a list or tuple of tensors, one per modality, got {type(xs).__name__}")
        if len(xs) != len(self.encoders):
            raise ValueError(f"xs has {len(xs)} tensors for {len(self.encoders)} encoders")
        for j, x in enumerate(xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"xs[{j}] must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 2:
                raise ValueError(f"xs[{j}] must be (B, *positions, D) with at least 2 dims, "
                                 f"got shape {tuple(x.shape)}")
        return list(xs)

    def forward(self, xs: Sequence[torch.Tensor], return_all_steps: bool = False):
        xs = self._check_inputs(xs)
        # Step 1 sees a zero context.
        inputs = [torch.cat([x, x.new_zeros(*x.shape[:-1], c)], dim=-1)
                  for x, c in zip(xs, self.context_dims)]
        head = self.fusion_head
        steps = []
        for step in range(self.iterations):
            hs = [encoder(x) for encoder, x in zip(self.encoders, inputs)]
            if step == self.iterations - 1:
                z = head(hs)
            elif len({bp.activation for bp in self.back_projections}) > 1:
                z = head(hs)
                inputs = [bp(x, z) for bp, x in zip(self.back_projections, xs)]
            else:
                z, inputs = ops.refine_step(
                    hs, head.weight, head.bias, xs,
                    [bp.weight for bp in self.back_projections],
                    [bp.bias for bp in self.back_projections],
                    head.activation, self.back_projections[0].activation, backend=self.backend)
            steps.append(z)
        return steps if return_all_steps else steps[-1]
