"""`python -m benchmarks [--quick] [--device cpu|cuda] [--ops ...] [--out DIR] [--compare BASELINE.json]`

Per op, side by side in one process, forward and forward+backward: eager PyTorch (the ops as plain
PyTorch in the input dtype), every fused backend this install has for the device, backend="auto"
(and which backend it chose), and torch.compile of the eager ops (compiled fresh per row and proven
compiled, see proof.py). Then whole models end to end (e2e.py). Each row states the bytes and FLOPs
the op must move and do, the achieved GB/s, and its ratio to this device's copy bandwidth and to the
floor max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the same run.

Writes DIR/bench.json (every row: median, p20, p80, what ran; the device, versions, date, threads)
and DIR/bench.png. Commit a run worth keeping as benchmarks/results/<device>.json;
`python -m benchmarks.report markdown FILE` makes the README's table from it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

import pf_kernels as pk
from pf_kernels import reference

from . import report
from .report import short_dtype
from .cases import EAGER, OPS, TOLERANCE, BackendOps, Case, all_cases, relative_error
from .e2e import e2e_providers, e2e_rows, select_variants
from .proof import (DynamoWarnings, ProvenCompile, describe_backends, fell_back_reason, record_backend_choice,
                    timed_region)
from .timing import copy_bandwidth, floor_seconds, host_floor, matmul_rate, measure_side_by_side

MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fused_backends(device: torch.device) -> List[str]:
    """The non-reference backends that serve this device in this install."""
    report_ = pk.available_backends()
    return [name for name, info in report_.items()
            if name != "torch" and info["available"] and device.type in info["devices"]]


def op_providers(device: torch.device, with_compile: bool) -> List[str]:
    return ["eager", *fused_backends(device), "auto"] + (["compile"] if with_compile else [])


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if not sys.stderr.isatty():  # a log: one line per step
            sys.stderr.write(f"{self.done}/{self.total} {elapsed:5.0f}s {what}\n")
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s {what[:48]:<48}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class Deadline:
    """Rows not started when the time limit has passed are marked skipped, so a run that must fit a
    slot still writes its results."""

    def __init__(self, seconds: Optional[float], start: Optional[float] = None):
        self.end = None if seconds is None else (start or time.perf_counter()) + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


def _outputs(result) -> List[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _leaves(inputs) -> List[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def rotation_sets(case: Case, dtype: torch.dtype, device: torch.device) -> int:
    """Input sets to rotate among, so that repeated calls do not just measure a warm cache: enough to
    pass twice the GPU's L2 (16 at most), 2 elsewhere."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    return int(min(16, max(2, math.ceil(2 * l2 / max(case.bytes("fwd", dtype), 1)))))


def _evaluate(fn, inputs, grads, mode) -> List[torch.Tensor]:
    out = _outputs(fn(*inputs))
    if mode == "fwd+bwd":
        out = out + list(torch.autograd.grad(out, _leaves(inputs), grads))
    return [t.detach() for t in out]


def _check(got: List[torch.Tensor], want: List[torch.Tensor], dtype) -> Optional[str]:
    worst = max(relative_error(g, w) for g, w in zip(got, want)) if len(got) == len(want) else math.inf
    bound = TOLERANCE.get(dtype, 3e-2)
    return None if worst <= bound else f"wrong result: relative error {worst:.2e} vs the reference (bound {bound:g})"


def time_group(case: Case, mode: str, dtype: torch.dtype, device: torch.device, providers: List[str],
               with_compile: bool, min_time: float, deadline: Deadline) -> List[dict]:
    """One row per provider for (case, mode, dtype): timed, or marked with why it was not."""
    base = dict(op=case.op, case=case.label, params=case.params, mode=mode, dtype=str(dtype), device=str(device),
                threads=torch.get_num_threads(), bytes=case.bytes(mode, dtype), flops=case.flops(mode))
    if deadline.passed():
        return [dict(base, provider=p, status="skipped (time limit)", ran=None) for p in providers]

    rotation = [case.make_inputs(device, dtype) for _ in range(rotation_sets(case, dtype, device))]
    with torch.no_grad():
        shapes = [o.shape for o in _outputs(case.call(reference, *rotation[0]))]
    grads = [[torch.randn(s, device=device, dtype=dtype) for s in shapes] for _ in rotation]

    def grad_mode():  # every call of a row, compiled ones included, in the grad mode it is timed in
        return torch.no_grad() if mode == "fwd" else contextlib.nullcontext()

    with grad_mode():
        truth = _evaluate(lambda *a: case.call(reference, *a), rotation[0], grads[0], mode)

    callers, status, ran, compiled = {}, {}, {}, None
    with grad_mode():
        for name in providers:
            if name == "compile":
                if not with_compile:
                    status[name] = "not compiled in --quick"
                    continue
                compiled = ProvenCompile(lambda *a: case.call(EAGER, *a))
                fn = compiled
            else:
                ops = EAGER if name == "eager" else BackendOps(name)
                fn = (lambda *a, ops=ops: case.call(ops, *a))
            try:
                if fn is compiled:
                    compiled.warm_up(lambda: _evaluate(fn, rotation[0], grads[0], mode), times=1)
                    why = compiled.check()
                    if why:
                        status[name] = why
                        continue
                    ran[name] = "inductor"
                    got = _evaluate(fn, rotation[0], grads[0], mode)
                else:
                    with record_backend_choice() as chosen:
                        got = _evaluate(fn, rotation[0], grads[0], mode)
                    ran[name] = "torch" if name == "eager" else describe_backends(chosen)
            except Exception as exc:  # marked, not timed; the other providers go on
                status[name] = fell_back_reason(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                                                compiled=fn is compiled)
                continue
            wrong = _check(got, truth, dtype)
            if wrong:
                status[name] = wrong
                continue
            callers[name] = _rotating(fn, rotation, grads, mode)

        with timed_region():
            measured = measure_side_by_side(callers, device, min_time_s=min_time, warmup=1)

    rows = []
    for name in providers:
        row = dict(base, provider=name, ran=ran.get(name))
        if name == "compile" and compiled is not None:
            row.update(compile_s=compiled.compile_s, graphs=compiled.graphs)
        result = measured.get(name)
        if name in status:
            row["status"] = status[name]
        elif "error" in result:
            row["status"] = fell_back_reason(result["error"], compiled=name == "compile")
        elif name == "compile" and compiled.recompiled_since_check():
            row["status"] = compiled.recompiled_since_check()
        else:
            row.update(status="ok", **result)
        rows.append(row)
    return rows


def _rotating(fn, rotation, grads, mode):
    counter = [0]

    def run_once():
        i = counter[0] = (counter[0] + 1) % len(rotation)
        inputs = rotation[i]
        out = _outputs(fn(*inputs))
        if mode == "fwd+bwd":
            torch.autograd.grad(out, _leaves(inputs), grads[i])

    return run_once


def add_ratios(rows: List[dict], copy_gbps: float, matmul_gflops: Dict[str, float]) -> None:
    eager = {(r["op"], r["case"], r["mode"], r["dtype"]): r["median_s"]
             for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = eager.get((r["op"], r["case"], r["mode"], r["dtype"]))
        r["speedup_vs_eager"] = base / r["median_s"] if base else None
        r["gbps"] = r["bytes"] / r["median_s"] / 1e9
        r["gflops"] = r["flops"] / r["median_s"] / 1e9
        r["fraction_of_copy_bw"] = r["gbps"] / copy_gbps
        r["floor_s"] = floor_seconds(r["bytes"], r["flops"], copy_gbps, matmul_gflops.get(r["dtype"]))
        r["fraction_of_floor"] = r["floor_s"] / r["median_s"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(name: str, device: torch.device) -> str:
    """A file name for the device class, e.g. nvidia-h100-80gb-hbm3, cpu-intel-xeon-2-50ghz."""
    name = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@", " ", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        return None


def _load() -> Optional[float]:
    """The 1-minute load average: above the core count, other work shared the CPU while timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def plot(rows: List[dict], e2e: List[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install .[bench])")
        return
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    panels = len(ops) + (1 if e2e else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] != "eager"
                   and r["status"] == "ok"]
            for provider, dtype in sorted({(r["provider"], r["dtype"]) for r in sel}):
                pts = sorted((r["bytes"], r["speedup_vs_eager"]) for r in sel
                             if r["provider"] == provider and r["dtype"] == dtype and r.get("speedup_vs_eager"))
                label = f"{provider} {mode} {dtype.replace('torch.', '')}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("bytes the op must move")
        ax.set_ylabel("speed-up vs eager PyTorch")
        ax.legend(fontsize=6)
    if e2e:
        ax = axes[0][-1]
        ok = [r for r in e2e if r["status"] == "ok" and r["provider"] != "eager" and r.get("speedup_vs_eager")]
        labels = sorted({(r["variant"], r["task"], r["B"]) for r in ok})
        providers = sorted({r["provider"] for r in ok})
        width = 0.8 / max(len(providers), 1)
        for k, provider in enumerate(providers):
            ys = [next((r["speedup_vs_eager"] for r in ok if (r["variant"], r["task"], r["B"]) == lab
                        and r["provider"] == provider), 0) for lab in labels]
            ax.bar([i + k * width for i in range(len(labels))], ys, width, label=provider)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels([f"{v}\n{t} B={b}" for v, t, b in labels], fontsize=6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title("end to end (vs the same model on eager)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the quick grid, shorter timing, --compile some, one end-to-end variant "
                             "(CPU: about 3 min on 2 cores; GPU: about 2 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS, help="ops to time (none: e2e only)")
    parser.add_argument("--cases", nargs="+", metavar="TEXT",
                        help="only the rows whose label holds one of these, e.g. 'B=4096' 'typical'")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="default: fp32 and bf16 on CUDA, fp32 on CPU (no fast bf16 GEMM on this class of CPU)")
    parser.add_argument("--compile", choices=("all", "some", "none"),
                        help="torch.compile's column: on every row (the default), on some (one row per op and the "
                             "first end-to-end size; the default with --quick), or none")
    parser.add_argument("--no-compile", action="store_const", dest="compile", const="none", help="= --compile none")
    parser.add_argument("--no-e2e", action="store_true", help="leave the end-to-end models out")
    parser.add_argument("--e2e", nargs="+", metavar="VARIANT", help="end-to-end variants (default: all; "
                        "--quick: pf-r3); see benchmarks/e2e.py VARIANTS")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--min-time", type=float, help="seconds of samples per provider and row")
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help="rows not started after S seconds are marked skipped and the results are still "
                             "written (the ops get the first 65%% of S when end-to-end rows follow)")
    parser.add_argument("--out", default="results", help="folder for bench.json and bench.png")
    parser.add_argument("--compare", metavar="BASELINE.json", help="print each row's change against a saved run")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else \
        [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    # fp32 matmuls are IEEE fp32 for every provider (torch's default); inductor's hint to allow tf32
    # would only say so again.
    warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")
    dynamo_warnings = DynamoWarnings().install()

    compile_mode = args.compile or ("some" if args.quick else "all")
    with_compile = compile_mode != "none"
    providers = op_providers(device, with_compile)
    cases = [c for c in all_cases(args.quick, args.ops, device.type)
             if not args.cases or any(text in c.label for text in args.cases)]
    # seconds of samples per provider and row (CUDA events resolve far finer than a shared CPU's clock)
    min_time = args.min_time or (0.03 if args.quick else 0.1 if device.type == "cuda" else 0.2)
    copy_gbps = copy_bandwidth(device)
    matmul_gflops = {str(dt): matmul_rate(device, dt) for dt in dtypes}
    fixed_costs = host_floor(device)
    name = device_name(device)
    meta = dict(device=str(device), device_name=name, device_class=device_slug(name, device),
                torch=torch.__version__, triton=_triton_version(), cuda=torch.version.cuda,
                python=platform.python_version(), pf_kernels=pk.__version__, commit=_git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                threads=torch.get_num_threads(), cores=os.cpu_count(), load_average=_load(), copy_gbps=copy_gbps, matmul_gflops=matmul_gflops,
                host_floor=fixed_costs, fp32_matmul_precision=torch.get_float32_matmul_precision(), quick=args.quick,
                providers=providers, dtypes=[str(d) for d in dtypes], argv=sys.argv[1:] if argv is None else argv,
                backends={k: {"available": v["available"], "reason": v["reason"]}
                          for k, v in pk.available_backends().items()})
    auto = {str(dt): report.auto_choice(device, dt) for dt in dtypes}
    print(report.header(meta))
    print(f"providers: {', '.join(providers)}; backend=\"auto\" resolves to "
          + ", ".join(f"{b} for {dt.replace('torch.', '')}" for dt, b in auto.items())
          + ("" if device.type == "cuda" else "; bf16 is not measured on CPU (no fast bf16 GEMM on this class of CPU)"))

    variants = [] if args.no_e2e else select_variants(args.e2e, args.quick)
    # Under a time limit the ops leave the end-to-end rows a third of it.
    deadline = Deadline(args.time_limit, started)
    ops_deadline = Deadline(args.time_limit * (0.65 if variants and cases else 1.0) if args.time_limit else None,
                            started)
    e2e_sizes = sum(len(v.sizes) for v in variants)
    progress = Progress(len(cases) * len(dtypes) + 2 * e2e_sizes)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")

    def save(rows, e2e, partial):
        meta["wall_s"] = time.perf_counter() - started
        meta["load_average_end"] = _load()
        meta["dynamo_warnings"] = dynamo_warnings.messages
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=report.summarize(rows), e2e=e2e, partial=partial),
                      f, indent=1, default=str)

    rows: List[dict] = []
    for case in cases:  # every dtype of a case before the next case: a time limit cuts sizes, not dtypes
        compile_row = compile_mode == "all" or (compile_mode == "some" and case.compile_in_quick(device.type))
        for dtype in dtypes:
            for mode in MODES:
                rows += time_group(case, mode, dtype, device, providers, compile_row, min_time, ops_deadline)
            progress.step(f"{case.op} {case.label} {short_dtype(str(dtype))}")
        add_ratios(rows, copy_gbps, matmul_gflops)
        save(rows, [], partial=True)

    ops_s = time.perf_counter() - started
    e2e: List[dict] = []
    if variants:
        e2e = e2e_rows(device, variants, e2e_providers(device, fused_backends(device), with_compile), args.quick,
                       progress, deadline, compile_sizes=1 if compile_mode == "some" else None,
                       after_each=lambda so_far: save(rows, so_far, partial=True))
    save(rows, e2e, partial=False)

    print()
    if rows:
        print(report.ops_table(rows, providers))
        print(report.summary_text(report.summarize(rows)))
        compiles = [r["compile_s"] for r in rows if r.get("compile_s")]
        print(f"ops: {ops_s:.0f} s from the start, of which {sum(compiles):.0f} s compiling {len(compiles)} rows "
              f"(outside the timing)")
    if e2e:
        print(report.e2e_table(e2e))
    targets = report.targets(dict(meta=meta, rows=rows, e2e=e2e))
    if targets:
        print(targets)
    print(f"\ndynamo/inductor warnings: {len(dynamo_warnings.messages)}"
          + "".join(f"\n  {m}" for m in dynamo_warnings.messages[:10]))
    print(f"wrote {json_path} ({time.perf_counter() - started:.0f} s); to keep it: "
          f"benchmarks/results/{meta['device_class']}.json")
    plot(rows, e2e, os.path.join(args.out, "bench.png"))
    if args.compare:
        with open(args.compare) as f:
            baseline = json.load(f)
        print()
        print(report.compare_text(dict(meta=meta, rows=rows, e2e=e2e), baseline))


if __name__ == "__main__":
    main()
