"""`python -m benchmarks [--quick] [--device cpu|cuda] [--ops ...] [--out results]`

Every available fused backend on the device vs eager PyTorch (the reference composed of ordinary ops)
vs torch.compile of that reference, side by side in one run, forward and forward+backward, then an
end-to-end ProgressiveFusion training step and inference. Prints a table, writes results/bench.json
and results/bench.png.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import torch

import pf_kernels as pk
from pf_kernels import reference

from .cases import BackendOps, Case, all_cases
from .e2e import E2E_SIZES, e2e_rows
from .timing import copy_bandwidth, measure_side_by_side

OPS = ("backproj_concat", "fusion_head", "refine_step")


def fused_backends(device: torch.device) -> List[str]:
    """The non-reference backends that serve this device in this install."""
    report = pk.available_backends()
    return [name for name, info in report.items()
            if name != "torch" and info["available"] and device.type in info["devices"]]


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s {what[:48]:<48}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def _outputs(result) -> List[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def time_case(case: Case, providers: Dict[str, object], device, dtype, modes, min_time, compiled_cache):
    """Rows for one case: every provider x mode, inputs rotated between calls."""
    rotation = [case.make_inputs(device, dtype) for _ in range(2)]
    rows = []
    for mode in modes:
        grads = [[torch.randn_like(o) for o in _outputs(case.call(reference, *inputs))] for inputs in rotation]
        runners = {}
        for provider, ops in providers.items():
            if provider == "compile":
                fn = compiled_cache.setdefault(case.op, torch.compile(lambda ops_, *a, c=case: c.call(ops_, *a)))
                call = lambda *a, fn=fn: fn(reference, *a)  # noqa: E731
            else:
                call = lambda *a, ops=ops: case.call(ops, *a)  # noqa: E731
            counter = [0]

            def run_once(call=call, counter=counter):
                i = counter[0] = (counter[0] + 1) % len(rotation)
                out = _outputs(call(*rotation[i]))
                if mode == "fwd+bwd":
                    torch.autograd.backward(out, grads[i])

            runners[provider] = run_once
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            all_stats = measure_side_by_side(runners, device, min_time_s=min_time)
        for provider, stats in all_stats.items():
            bytes_moved = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
            flops = case.flops_fwd + (case.flops_bwd if mode == "fwd+bwd" else 0)
            bytes_moved = bytes_moved * torch.finfo(dtype).bits // 32
            rows.append(dict(op=case.op, case=case.label, params=case.params, mode=mode, dtype=str(dtype),
                             provider=provider, bytes=bytes_moved, flops=flops, **stats,
                             gbps=bytes_moved / stats["median_s"] / 1e9,
                             gflops=flops / stats["median_s"] / 1e9))
    return rows


def add_ratios(rows: List[dict], copy_gbps: float) -> None:
    eager = {(r["op"], r["case"], r["mode"], r["dtype"]): r["median_s"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        base = eager.get((r["op"], r["case"], r["mode"], r["dtype"]))
        r["speedup_vs_eager"] = base / r["median_s"] if base else None
        r["fraction_of_copy_bw"] = r["gbps"] / copy_gbps


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def print_table(rows: List[dict], providers: List[str]) -> None:
    header = f"{'op':16s} {'case':22s} {'mode':7s} " + " ".join(f"{p + ' us':>12s}" for p in providers) + \
        "  " + " ".join(f"{'x' + p:>9s}" for p in providers if p != "eager") + f"  {'GB/s':>7s} {'%copy':>6s}"
    print(header)
    print("-" * len(header))
    keyed = {}
    for r in rows:
        keyed.setdefault((r["op"], r["case"], r["mode"], r["dtype"]), {})[r["provider"]] = r
    for (op, case, mode, dtype), by_provider in keyed.items():
        best_fused = min((r for p, r in by_provider.items() if p not in ("eager", "compile")),
                         key=lambda r: r["median_s"], default=by_provider.get("eager"))
        line = f"{op:16s} {case:22s} {mode:7s} "
        line += " ".join(f"{by_provider[p]['median_s'] * 1e6:12.1f}" if p in by_provider else f"{'-':>12s}"
                         for p in providers)
        line += "  " + " ".join(f"{by_provider[p]['speedup_vs_eager']:9.2f}" if p in by_provider else f"{'-':>9s}"
                                for p in providers if p != "eager")
        line += f"  {best_fused['gbps']:7.2f} {100 * best_fused['fraction_of_copy_bw']:5.1f}%"
        print(line)


def summarize(rows: List[dict], providers: List[str]) -> Dict[str, dict]:
    summary = {}
    for op in {r["op"] for r in rows}:
        for mode in ("fwd", "fwd+bwd"):
            for p in providers:
                if p == "eager":
                    continue
                sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] == p]
                if not sel:
                    continue
                ratios = [r["speedup_vs_eager"] for r in sel]
                small = [r["speedup_vs_eager"] for r in sel if r["params"]["B"] <= 256]
                summary[f"{op} {mode} {p}"] = dict(geomean=geomean(ratios), min=min(ratios), max=max(ratios),
                                                   geomean_B_le_256=geomean(small), rows=len(sel))
    return summary


def plot(rows: List[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install .[bench])")
        return
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] != "eager"]
            for provider in sorted({r["provider"] for r in sel}):
                pts = sorted(((r["bytes"], r["speedup_vs_eager"]) for r in sel if r["provider"] == provider))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{provider} {mode}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("bytes the op must move")
        ax.set_ylabel("speed-up vs eager PyTorch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller grid and shorter timing (< 3 min on 2 cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--no-e2e", action="store_true", help="leave the end-to-end model out")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    backends = fused_backends(device)
    providers: Dict[str, object] = {"eager": reference}
    providers.update({b: BackendOps(b) for b in backends})
    if not args.no_compile:
        providers["compile"] = None
    min_time = 0.05 if args.quick else 0.25
    modes = ("fwd", "fwd+bwd")
    cases = all_cases(args.quick, args.ops)
    copy_gbps = copy_bandwidth(device)
    print(f"pf_kernels {pk.__version__} | torch {torch.__version__} | device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}) | "
          f"threads {torch.get_num_threads()} | copy bandwidth {copy_gbps:.1f} GB/s")
    print(f"providers: {', '.join(providers)}; dtypes: {', '.join(map(str, dtypes))}"
          + ("" if device.type == "cuda" else " (bf16 is not measured on CPU: no fast bf16 GEMM on this class of CPU)"))

    progress = Progress(len(cases) * len(dtypes) + (0 if args.no_e2e else 2 * len(E2E_SIZES)))
    rows, compiled = [], {}
    for dtype in dtypes:
        for case in cases:
            rows += time_case(case, providers, device, dtype, modes, min_time, compiled)
            progress.step(f"{case.op} {case.label} {dtype}")
    add_ratios(rows, copy_gbps)
    e2e = [] if args.no_e2e else e2e_rows(device, backends, not args.no_compile, args.quick, progress)

    names = list(providers)
    print()
    print_table(rows, names)
    summary = summarize(rows, names)
    print("\nspeed-up vs eager (geometric mean over the grid; min; geomean over B <= 256):")
    for key, s in sorted(summary.items()):
        print(f"  {key:36s} geomean {s['geomean']:5.2f}x  min {s['min']:5.2f}x  B<=256 {s['geomean_B_le_256']:5.2f}x")
    if e2e:
        print("\nend to end, ProgressiveFusion (K=3, R=3):")
        for r in e2e:
            print(f"  B={r['B']:<4d} T={r['T']:<3d} {r['task']:10s} {r['provider']:8s} median {r['median_s'] * 1e3:8.2f} ms  "
                  f"p20 {r['p20_s'] * 1e3:7.2f}  p80 {r['p80_s'] * 1e3:7.2f}  x{r['speedup_vs_eager']:.2f} vs eager")

    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                platform.processor() or platform.machine(), torch=torch.__version__,
                triton=_triton_version(), threads=torch.get_num_threads(), copy_gbps=copy_gbps,
                quick=args.quick, providers=names, backends=pk.available_backends(), python=platform.python_version())
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summary, e2e=e2e), f, indent=1, default=str)
    print(f"wrote {os.path.join(args.out, 'bench.json')}")
    plot(rows, os.path.join(args.out, "bench.png"))


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
