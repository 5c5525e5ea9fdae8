"""Progressive Fusion vs late fusion on synthetic multimodal time series: accuracy, robustness, speed.

Run: python python/timeseries_demo.py [--quick] [--seed N] [--device cpu|cuda] [--backend auto|torch|...]

The paper's time-series task (MultiBench finance) treats groups of stock series as modalities and
predicts a future value. Real market data cannot be downloaded here, so this program makes its own,
in the same spirit, where late fusion provably loses information that backward connections recover.

The generator (`make_data`)
---------------------------
K modalities ("sectors"), each a series of C channels ("stocks") over T steps ("days"):

    x_j[t, c] = a_j[c] . f[t] + p_j[t, c] + sigma_j * e_j[t, c]

- f: L shared latent factors (the market), AR(1) with coefficient 0.8, seen by every modality
  through its fixed loadings a_j: a confound shared across modalities;
- p_j: each channel's private AR(1) signal with coefficient PHI = 0.95 (the stock's own trend);
- e_j: modality-specific white noise, its scale sigma_j different per modality.

The target is tomorrow's private signal of one stock index in every other sector:

    r = argmax_c x_0[T-1, c]                    (which stock leads sector 0 on the last day)
    y = sum_{j>=1} p_j[T, r]                    (stock r of every other sector, one step ahead)

Modality 0 decides *which* channel matters; the other modalities hold its value. Each encoder ends
in a narrow bottleneck (ENCODER_DIM = 2 < C = 4 features), like MultiBench's small per-stock
encoders: under late fusion, encoder j >= 1 cannot know r and must squeeze all C channels through
it, so part of the signal is lost before fusion. With Progressive Fusion the fused vector of step 1
carries r back into every encoder's input, and at step 2 encoder j can keep just channel r. That is
the situation the paper's backward connections address ("fuse it or lose it"). The irreducible
MSE (the AR innovations of the K-1 target terms) is (K-1)(1 - PHI^2) = 0.195 for K = 3.

What it reports
---------------
- test MSE, mean and std over seeds, for late fusion (R = 1: the same encoders with no backward
  connections) and Progressive Fusion with R = 2 and R = 3, and each model's parameter count;
- robustness: test MSE when Gaussian noise of scale s * std(x_j) is added to one modality at test time,
  s in 0.0, 0.1, ..., 0.8 (the paper's levels), summarised as the paper does: the relative drop
  mse(s) / mse(0) - 1 averaged over the levels, and the area under the MSE-vs-noise curve;
- the wall-clock of one training epoch of the R = 3 model with the chosen fused backend vs `torch`,
  and its cost relative to late fusion before and after hoisting (ProgressiveFusion computes each
  encoder's first Linear over x once per forward, not once per step; `hoist=False` turns it off).
Writes results/timeseries_demo.json and results/timeseries_demo.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pf_kernels  # noqa: E402
from pf_kernels._dispatch import resolve_backend  # noqa: E402
from pf_kernels.nn import FusionHead, ProgressiveFusion  # noqa: E402

PHI = 0.95          # private signals' AR(1) coefficient
FACTOR_PHI = 0.8    # shared factors' AR(1) coefficient
LOADING = 0.3       # scale of each modality's loadings on the shared factors
SIGMA = 0.1         # observation noise of modality 0; modality j gets SIGMA * (1 + j/2)
NOISE_LEVELS = [round(0.1 * i, 1) for i in range(9)]
MODELS = {"late_fusion": 1, "progressive_fusion_r2": 2, "progressive_fusion_r3": 3}


# ----------------------------------------------------------------------------------------------
# Data

def _ar1(shape, phi: float, generator: torch.Generator) -> torch.Tensor:
    """AR(1) series along dim 1 with unit stationary variance."""
    n, steps = shape[0], shape[1]
    eps = torch.randn(shape, generator=generator) * math.sqrt(1 - phi * phi)
    out = torch.empty(shape)
    out[:, 0] = torch.randn((n, *shape[2:]), generator=generator)
    for t in range(1, steps):
        out[:, t] = phi * out[:, t - 1] + eps[:, t]
    return out


def make_data(n: int, seed: int, modalities: int = 3, channels: int = 4, steps: int = 16,
              factors: int = 2, world_seed: int = 1234):
    """n samples: (xs, y) with xs[j] of shape (n, steps, channels) and y of shape (n, 1).

    The loadings and noise scales (the "world") come from world_seed and are the same for every
    split; the series come from seed.
    """
    world = torch.Generator().manual_seed(world_seed)
    loadings = [torch.randn(channels, factors, generator=world) * LOADING for _ in range(modalities)]
    sigmas = [SIGMA * (1 + 0.5 * j) for j in range(modalities)]
    g = torch.Generator().manual_seed(seed)
    f = _ar1((n, steps + 1, factors), FACTOR_PHI, g)
    xs, privates = [], []
    for j in range(modalities):
        p = _ar1((n, steps + 1, channels), PHI, g)
        x = f[:, :steps] @ loadings[j].T + p[:, :steps] + sigmas[j] * torch.randn(n, steps, channels, generator=g)
        xs.append(x)
        privates.append(p)
    r = xs[0][:, -1].argmax(-1)
    rows = torch.arange(n)
    y = sum(privates[j][rows, steps, r] for j in range(1, modalities))
    return xs, y.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# Models

class SeriesEncoder(nn.Module):
    """(B, T, C) -> (B, out_dim): a per-step MLP, pooled as [last step, mean over steps], then a
    narrow linear bottleneck."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.step = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(2 * hidden, out_dim)

    def forward(self, x):
        h = self.step(x)
        return self.out(torch.cat([h[:, -1], h.mean(1)], -1))


class LateFusion(nn.Module):
    """The baseline: the same encoders on the raw inputs, one fusion head, a linear readout."""

    def __init__(self, channels: Sequence[int], hidden: int, encoder_dim: int, fused_dim: int, backend: str):
        super().__init__()
        self.encoders = nn.ModuleList(SeriesEncoder(c, hidden, encoder_dim) for c in channels)
        self.fusion_head = FusionHead([encoder_dim] * len(channels), fused_dim, backend=backend)
        self.readout = nn.Linear(fused_dim, 1)

    def forward(self, xs):
        return self.readout(self.fusion_head([enc(x) for enc, x in zip(self.encoders, xs)]))


class ProgressiveModel(nn.Module):
    """pf_kernels.nn.ProgressiveFusion around the same encoders (inputs widened by the context)."""

    def __init__(self, channels: Sequence[int], hidden: int, encoder_dim: int, fused_dim: int,
                 context_dim: int, iterations: int, backend: str, hoist: bool = True):
        super().__init__()
        encoders = [SeriesEncoder(c + context_dim, hidden, encoder_dim) for c in channels]
        # SeriesEncoder begins with self.step(x), a Sequential whose first layer is an nn.Linear:
        # ProgressiveFusion hoists it (x's projection once per forward, not once per step).
        self.fusion = ProgressiveFusion(encoders, [encoder_dim] * len(channels), fused_dim, context_dim,
                                        iterations=iterations, context_activation="tanh", backend=backend,
                                        hoist=hoist)
        self.readout = nn.Linear(fused_dim, 1)

    def forward(self, xs):
        return self.readout(self.fusion(xs))


def build_model(name: str, cfg: dict, backend: str, hoist: bool = True) -> nn.Module:
    iterations = MODELS[name]
    channels = [cfg["channels"]] * cfg["modalities"]
    if iterations == 1:
        return LateFusion(channels, cfg["hidden"], cfg["encoder_dim"], cfg["fused_dim"], backend)
    return ProgressiveModel(channels, cfg["hidden"], cfg["encoder_dim"], cfg["fused_dim"],
                            cfg["context_dim"], iterations, backend, hoist)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Training and evaluation

class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.start = total, label, 0, time.perf_counter()

    def step(self, info: str = "") -> None:
        self.done += 1
        width = 28
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label:24s} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {elapsed:5.1f}s {info}   ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def iterate_batches(n: int, batch: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch):
        yield order[start:start + batch]


def train_epoch(model, opt, xs, y, batch: int, generator: torch.Generator) -> float:
    model.train()
    total = 0.0
    for idx in iterate_batches(y.shape[0], batch, generator):
        loss = nn.functional.mse_loss(model([x[idx] for x in xs]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * idx.numel()
    return total / y.shape[0]


@torch.no_grad()
def evaluate(model, xs, y, batch: int = 4096) -> float:
    model.eval()
    se = 0.0
    for start in range(0, y.shape[0], batch):
        pred = model([x[start:start + batch] for x in xs])
        se += (pred - y[start:start + batch]).pow(2).sum().item()
    return se / y.shape[0]


def noisy(xs, modality: int, scale: float, generator: torch.Generator):
    out = list(xs)
    x = xs[modality]
    out[modality] = x + scale * x.std() * torch.randn(x.shape, generator=generator).to(x.device)
    return out


def fit(name: str, cfg: dict, data, seed: int, backend: str, device: torch.device) -> dict:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    model = build_model(name, cfg, backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["epochs"])
    shuffle = torch.Generator().manual_seed(seed)
    bar = Progress(cfg["epochs"], f"{name} seed {seed}")
    best_val, best_state = float("inf"), None
    for _ in range(cfg["epochs"]):
        loss = train_epoch(model, opt, train_x, train_y, cfg["batch"], shuffle)
        sched.step()
        val = evaluate(model, val_x, val_y)
        if val < best_val:  # model selection on the validation split, as MultiBench does
            best_val = val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.step(f"train {loss:.3f} val {val:.3f}")
    model.load_state_dict(best_state)
    noise_gen = torch.Generator().manual_seed(seed + 7)
    robust = [evaluate(model, noisy(test_x, cfg["noisy_modality"], s, noise_gen), test_y)
              for s in NOISE_LEVELS]
    # NOISE_LEVELS[0] is 0: the clean test MSE, not evaluated a second time.
    return {"mse": robust[0], "robust_mse": robust, "params": count_params(model)}


def relative_drop(robust_mse: Sequence[float]) -> float:
    """The mean over noise levels of mse(s) / mse(0) - 1: 0 means noise does not hurt at all."""
    return statistics.fmean(m / robust_mse[0] - 1 for m in robust_mse[1:])


def area_under_curve(robust_mse: Sequence[float]) -> float:
    """Trapezoid area under MSE vs noise scale (lower is better)."""
    return sum((a + b) / 2 * (s1 - s0) for a, b, s0, s1 in
               zip(robust_mse, robust_mse[1:], NOISE_LEVELS, NOISE_LEVELS[1:]))


def time_epochs(cfg: dict, data, device: torch.device, epochs: int, variants: Dict[str, tuple]) -> Dict[str, float]:
    """Median seconds per training epoch of each variant (model name, backend, hoist), timed side by
    side: one epoch of each per round, so a slow spell of the machine hits all alike."""
    (train_x, train_y), _, _ = data
    runs = {}
    for key, (name, backend, hoist) in variants.items():
        torch.manual_seed(0)
        model = build_model(name, cfg, backend, hoist).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        gen = torch.Generator().manual_seed(0)
        train_epoch(model, opt, train_x, train_y, cfg["batch"], gen)  # warm-up
        runs[key] = (model, opt, gen)
    times = {key: [] for key in variants}
    for _ in range(epochs):
        for key, (model, opt, gen) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_epoch(model, opt, train_x, train_y, cfg["batch"], gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


# ----------------------------------------------------------------------------------------------
# Reporting

def print_table(results: Dict[str, dict], timing: dict) -> None:
    late = results["late_fusion"]
    print()
    print(f"{'model':24s} {'params':>7s} {'test MSE (mean +- std)':>24s} {'vs late':>8s} "
          f"{'rel. drop':>9s} {'AUC':>7s}")
    for name, r in results.items():
        gain = r["mse_mean"] / late["mse_mean"] - 1
        print(f"{name:24s} {r['params']:7d} {r['mse_mean']:13.4f} +- {r['mse_std']:.4f} "
              f"{100 * gain:+7.1f}% {r['robust_relative_drop']:9.3f} {r['robust_auc']:7.4f}")
    print("rel. drop: mean over noise levels of mse(s)/mse(0) - 1 (lower: more robust); "
          "AUC: area under MSE vs noise (lower: better under noise)")
    print("\nMSE with noise on modality", results["late_fusion"]["noisy_modality"], "at scales", NOISE_LEVELS)
    for name, r in results.items():
        print(f"  {name:24s} " + " ".join(f"{m:.3f}" for m in r["robust_mse"]))
    if timing:
        print(f"\ntraining epoch of the R = 3 model ({timing['samples']} samples, batch {timing['batch']}, "
              f"{timing['device']}): backend {timing['fused_backend']!r} {timing['fused_s']:.3f} s, "
              f"'torch' {timing['torch_s']:.3f} s -> {timing['speedup']:.2f}x")
        print(f"cost of Progressive Fusion R = 3 relative to late fusion ({timing['late_fusion_s']:.3f} s), "
              f"backend {timing['fused_backend']!r}: {timing['pf_cost_unhoisted']:.2f}x unhoisted "
              f"({timing['unhoisted_s']:.3f} s), {timing['pf_cost_hoisted']:.2f}x hoisted "
              f"(encoders {list(timing['hoisted'])} hoisted)")


def save_plot(results: Dict[str, dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(NOISE_LEVELS, r["robust_mse"], marker="o", label=f"{name} ({r['params']} params)")
    ax.set_xlabel(f"noise scale on modality {results['late_fusion']['noisy_modality']} (x its std)")
    ax.set_ylabel("test MSE")
    ax.set_title("Late fusion vs Progressive Fusion (synthetic multimodal series)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------

CONFIGS = {
    "full": dict(train=8192, val=2048, test=8192, epochs=40, seeds=5, timing_epochs=5),
    "quick": dict(train=4096, val=1024, test=4096, epochs=20, seeds=3, timing_epochs=3),
    "tiny": dict(train=256, val=64, test=128, epochs=2, seeds=2, timing_epochs=1),  # smoke test only
}
MODEL_CFG = dict(modalities=3, channels=4, steps=16, hidden=32, encoder_dim=2, fused_dim=16,
                 context_dim=4, batch=128, lr=5e-3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, epochs and seeds (< 5 min on 2 CPU cores)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds; for the smoke test
    p.add_argument("--seed", type=int, default=0, help="first seed; the runs use seed, seed+1, ...")
    p.add_argument("--seeds", type=int, default=None, help="how many seeds (default 5, --quick 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto", help="pf_kernels backend for the fused model: auto, torch, cpu, ...")
    p.add_argument("--noisy-modality", type=int, default=1, help="the modality that gets test-time noise")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results", help="folder for timeseries_demo.json and .png")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    run = dict(CONFIGS[mode])
    if args.seeds is not None:
        run["seeds"] = args.seeds
    cfg = dict(MODEL_CFG, epochs=run["epochs"], noisy_modality=args.noisy_modality)
    if not 0 <= args.noisy_modality < cfg["modalities"]:
        raise SystemExit(f"--noisy-modality must be in [0, {cfg['modalities']}), got {args.noisy_modality}")
    fused = resolve_backend(args.backend, "backproj_concat", device, torch.float32)  # fails early if it cannot serve
    print(f"timeseries demo ({mode}): {cfg['modalities']} modalities x {cfg['channels']} channels x "
          f"{cfg['steps']} steps, {run['train']} train / {run['test']} test samples, {run['epochs']} epochs, "
          f"seeds {args.seed}..{args.seed + run['seeds'] - 1}, device {device}, fused backend {fused!r}")

    def split(n, seed):
        xs, y = make_data(n, seed, cfg["modalities"], cfg["channels"], cfg["steps"])
        return [x.to(device) for x in xs], y.to(device)

    per_model: Dict[str, List[dict]] = {name: [] for name in MODELS}
    for i in range(run["seeds"]):
        seed = args.seed + i
        data = (split(run["train"], 3 * seed + 1), split(run["val"], 3 * seed + 2), split(run["test"], 3 * seed + 3))
        for name in MODELS:
            per_model[name].append(fit(name, cfg, data, seed, args.backend, device))

    results = {}
    for name, runs in per_model.items():
        mses = [r["mse"] for r in runs]
        robust = [statistics.fmean(r["robust_mse"][k] for r in runs) for k in range(len(NOISE_LEVELS))]
        results[name] = {
            "iterations": MODELS[name],
            "params": runs[0]["params"],
            "mse_mean": statistics.fmean(mses),
            "mse_std": statistics.stdev(mses) if len(mses) > 1 else 0.0,
            "mse_per_seed": mses,
            "noise_levels": NOISE_LEVELS,
            "noisy_modality": args.noisy_modality,
            "robust_mse": robust,
            "robust_relative_drop": relative_drop(robust),
            "robust_mse_increase": robust[-1] - robust[0],
            "robust_auc": area_under_curve(robust),
        }

    timing = {}
    if run["timing_epochs"]:
        data = (split(run["train"], 10_001), None, None)
        pf = "progressive_fusion_r3"
        t = time_epochs(cfg, data, device, run["timing_epochs"], {
            "fused": (pf, args.backend, True), "torch": (pf, "torch", True),
            "unhoisted": (pf, args.backend, False), "late_fusion": ("late_fusion", args.backend, True)})
        hoisted = build_model(pf, cfg, args.backend).fusion.hoisted
        timing = {"fused_backend": fused, "fused_s": t["fused"], "torch_s": t["torch"],
                  "speedup": t["torch"] / t["fused"], "unhoisted_s": t["unhoisted"],
                  "late_fusion_s": t["late_fusion"], "pf_cost_unhoisted": t["unhoisted"] / t["late_fusion"],
                  "pf_cost_hoisted": t["fused"] / t["late_fusion"], "hoisted": list(hoisted),
                  "samples": run["train"], "batch": cfg["batch"], "device": str(device),
                  "threads": torch.get_num_threads()}

    print_table(results, timing)
    os.makedirs(args.out, exist_ok=True)
    report = {**results, "epoch_time": timing,
              "config": {"mode": mode, **run, **cfg, "first_seed": args.seed, "backend": args.backend},
              "versions": {"torch": torch.__version__, "pf_kernels": getattr(pf_kernels, "__version__", "?")}}
    json_path = os.path.join(args.out, "timeseries_demo.json")
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=2)
    png_path = os.path.join(args.out, "timeseries_demo.png")
    wrote_png = save_plot(results, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if wrote_png else ""))
    return report


if __name__ == "__main__":
    main()
