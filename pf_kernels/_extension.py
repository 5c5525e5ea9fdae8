"""Loads the compiled extension pf_kernels._C and registers what its ops need from Python:
the fake (meta) implementations used by torch.compile and opcheck. Autograd is registered in C++
(csrc/ops/), one node per call; the backward ops have their own device kernels."""
from __future__ import annotations

import torch

_loaded = False


def load() -> None:
    """Imports pf_kernels._C once; raises ImportError saying why it cannot be used."""
    global _loaded
    if _loaded:
        return
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.pf_kernels.*)
    except ImportError as exc:
        raise ImportError(
            f"pf_kernels._C is not built or does not load with torch {torch.__version__} ({exc}); "
            "build it with `pip install --no-build-isolation .` (or `make build`) against this torch"
        ) from exc
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
    def _backproj_concat_backward(grad_out, out, z, weight, bias, activation, x_features):
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
