"""A ProgressiveFusion training step (K=3, R=3, Adam) captured in a CUDA graph and replayed,
against the same steps run eagerly, per GPU backend (and under bf16 autocast).

The step reads static input tensors; the replay copies new batches into them. After N steps the
parameters of the replayed model and of its eager twin must agree. Capture fails on any host sync
or an allocation outside the caching allocator, so a pass also shows the ops are capture-safe
(after the warm-up that triton's autotuning and cuBLAS's workspaces need).

  python tests/gpu/graph_capture.py [--backends cuda,triton,auto] [--steps 4]

On a CPU it runs the eager halves only (no capture): the CPU twin that keeps this script working.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from pf_kernels.nn import ProgressiveFusion


class SequenceEncoder(nn.Module):
    """(B, T, D) -> (B, H): a Linear over every position, then the mean over time."""

    def __init__(self, d, h):
        super().__init__()
        self.proj = nn.Linear(d, h)

    def forward(self, x):
        return torch.relu(self.proj(x)).mean(1)


class ImageEncoder(nn.Module):
    """(B, H, W, C) channels-last -> (B, D)."""

    def __init__(self, c, d):
        super().__init__()
        self.proj = nn.Linear(c, d)

    def forward(self, x):
        return torch.tanh(self.proj(x)).amax(dim=(1, 2))


def build(backend: str, device: str, seed: int = 0):
    torch.manual_seed(seed)
    ctx = [4, 3, 2]
    encoders = [nn.Sequential(nn.Linear(20 + ctx[0], 32), nn.ReLU(), nn.Linear(32, 24)),
                SequenceEncoder(6 + ctx[1], 24), ImageEncoder(3 + ctx[2], 16)]
    model = ProgressiveFusion(encoders, [24, 24, 16], 32, ctx, iterations=3, context_activation="tanh",
                              backend=backend).to(device)
    readout = nn.Linear(32, 1).to(device)
    params = [*model.parameters(), *readout.parameters()]
    capturable = device == "cuda"
    opt = torch.optim.Adam(params, lr=1e-2, capturable=capturable)
    return model, readout, opt


def batches(device: str, count: int, B: int = 48):
    g = torch.Generator(device="cpu").manual_seed(1234)
    out = []
    for _ in range(count):
        xs = [torch.randn(B, 20, generator=g), torch.randn(B, 10, 6, generator=g),
              torch.randn(B, 5, 7, 3, generator=g)]
        y = torch.randn(B, 1, generator=g)
        out.append(([x.to(device) for x in xs], y.to(device)))
    return out


def make_step(model, readout, opt, autocast_dtype):
    def step(xs, y):
        with torch.autocast(y.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None, cache_enabled=False):
            pred = readout(model(xs))
        loss = nn.functional.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss
    return step


def check(backend: str, device: str, steps: int, autocast_dtype=None) -> str:
    """'' on success, else what went wrong."""
    model, readout, opt = build(backend, device)
    twin = copy.deepcopy((model, readout))
    twin_opt = torch.optim.Adam([*twin[0].parameters(), *twin[1].parameters()], lr=1e-2,
                                capturable=device == "cuda")
    data = batches(device, steps + 3)
    step = make_step(model, readout, opt, autocast_dtype)
    twin_step = make_step(*twin, twin_opt, autocast_dtype)

    # Both models take the same warm-up steps (autotuning, cuBLAS handles, Adam's state).
    static_xs = [x.clone() for x in data[0][0]]
    static_y = data[0][1].clone()
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for xs, y in data[:3]:
                step(xs, y)
        torch.cuda.current_stream().wait_stream(side)
    else:
        for xs, y in data[:3]:
            step(xs, y)
    for xs, y in data[:3]:
        twin_step(xs, y)

    losses, twin_losses = [], []
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(static_xs, static_y)
        for xs, y in data[3:]:
            for s, x in zip(static_xs, xs):
                s.copy_(x)
            static_y.copy_(y)
            graph.replay()
            losses.append(static_loss.item())
    else:
        for xs, y in data[3:]:
            losses.append(step(xs, y).item())
    for xs, y in data[3:]:
        twin_losses.append(twin_step(xs, y).item())

    tol = 1e-4 if autocast_dtype is None else 3e-2
    problems = []
    if any(l != l for l in losses):
        problems.append(f"NaN loss {losses}")
    for (n, p), q in zip([*model.named_parameters(), *readout.named_parameters()],
                         [*twin[0].parameters(), *twin[1].parameters()]):
        err = (p.detach() - q.detach()).abs().max().item()
        if not err <= tol * max(1.0, q.abs().max().item()):
            problems.append(f"{n} differs by {err:.3g}")
    if not all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(losses, twin_losses)):
        problems.append(f"losses {losses} vs eager {twin_losses}")
    return "; ".join(problems[:5])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=None, help="default: cuda,triton,auto on cuda; cpu,torch on cpu")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    import pf_kernels as pk

    backends = (args.backends or ("cuda,triton,auto" if args.device == "cuda" else "cpu,torch")).split(",")
    failures = 0
    for backend in backends:
        info = pk.available_backends().get(backend)
        if backend != "auto" and (info is None or not info["available"]):
            print(f"graph {backend}: SKIPPED ({info['reason'] if info else 'unknown backend'})")
            continue
        variants = [None] + ([torch.bfloat16] if args.device == "cuda" else [])
        for dtype in variants:
            label = f"graph {backend}{' autocast ' + str(dtype)[6:] if dtype else ''}"
            start = time.perf_counter()
            try:
                problem = check(backend, args.device, args.steps, dtype)
            except Exception as exc:
                problem = f"raised {type(exc).__name__}: {str(exc)[:400]}"
            mode = "captured+replayed" if args.device == "cuda" else "eager twin only (no GPU)"
            print(f"{label}: {'FAIL ' + problem if problem else 'ok'} ({mode}, {args.steps} steps, "
                  f"{time.perf_counter() - start:.1f} s)")
            failures += bool(problem)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
