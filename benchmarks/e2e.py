"""End to end: a ProgressiveFusion model (K = 3, R = 3) with small encoders, one training step
(forward + backward + Adam step) and inference, per backend, vs eager and torch.compile."""
from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn

from pf_kernels.nn import ProgressiveFusion

from .timing import measure_side_by_side


class PositionMLP(nn.Module):
    """(B, *positions, D) -> (B, H): a per-position MLP, then the mean over positions."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x):
        y = self.mlp(x)
        return y.flatten(1, -2).mean(1) if y.dim() > 2 else y


def build(device, B: int, T: int):
    dims, context, enc, fused = (32, 16, 8), 16, 64, 64
    torch.manual_seed(0)
    model = ProgressiveFusion([PositionMLP(d + context, enc) for d in dims], [enc] * 3, fused, context,
                              iterations=3).to(device)
    head = nn.Linear(fused, 1).to(device)
    xs = [torch.randn(B, dims[0], device=device), torch.randn(B, T, dims[1], device=device),
          torch.randn(B, T, dims[2], device=device)]
    y = torch.randn(B, 1, device=device)
    return model, head, xs, y


# B = 8 is launch-bound (per-op overhead dominates), B = 256 is bound by the encoders' GEMMs.
E2E_SIZES = ((8, 50), (256, 50))


def e2e_rows(device, backends: List[str], with_compile: bool, quick: bool, progress) -> List[dict]:
    rows = []
    for B, T in E2E_SIZES:
        rows += _rows_for_size(device, backends, with_compile, quick, progress, B, T)
    return rows


def _rows_for_size(device, backends, with_compile, quick, progress, B, T) -> List[dict]:
    base, base_head, xs, y = build(device, B, T)
    providers = {"eager": "torch", **{b: b for b in backends}}
    if with_compile:
        providers["compile"] = "torch"
    rows = []
    for task in ("train", "inference"):
        runners = {}
        for provider, backend in providers.items():
            model, head = copy.deepcopy(base), copy.deepcopy(base_head)
            model.backend = backend
            forward = (lambda xs_, m=model, h=head: h(m(xs_)))
            if provider == "compile":
                forward = torch.compile(forward)
            opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)

            def train_step(forward=forward, opt=opt):
                loss = nn.functional.mse_loss(forward(xs), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def infer(forward=forward, compiled=provider == "compile"):
                with torch.no_grad() if compiled else torch.inference_mode():
                    forward(xs)

            runners[provider] = train_step if task == "train" else infer
        stats = measure_side_by_side(runners, device, min_time_s=0.3 if quick else 1.0, warmup=3)
        rows += [dict(task=task, provider=p, B=B, T=T, K=3, R=3, **stats[p]) for p in runners]
        progress.step(f"e2e {task} B={B}")
    for task in ("train", "inference"):
        eager = next(r["median_s"] for r in rows if r["task"] == task and r["provider"] == "eager")
        for r in rows:
            if r["task"] == task:
                r["speedup_vs_eager"] = eager / r["median_s"]
    return rows
