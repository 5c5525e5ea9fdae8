"""Hardware counters of our CUDA kernels (Nsight Compute): what bounds each one, for issue 12.

    python -m benchmarks.ncu --out $OUT/profile        # ncu over the workload: ncu.txt and a summary
    python -m benchmarks.ncu --workload                 # the profiled calls alone (what ncu runs)

benchmarks.profile times every kernel of a row (ours, cuBLAS's, torch's) but cannot say why one of
ours is slow: the H100 run of 2026-11-27 timed fusion_head's WMMA kernel at 17.8 us where eager's
cuBLAS GEMM took 2.9 us (B=256, bf16), and backproj_concat's forward at 9.7 us for 0.25 MB. This
runs ncu over the cuda backend's calls of the --quick op grid at B <= 256 (forward, then
forward+backward; bf16 unless --dtypes says more) and one fp32 training step of the pf-r3 model per size, each labelled
with an NVTX range.
Only pf_kernels' own kernels are profiled, only inside those calls (cudaProfilerStart/Stop), with
the clocks as found (--clock-control none). Writes ncu's full report (ncu.txt) and prints one line
per kernel, grouped by row: its name, grid x block, duration, SM and memory throughput as % of
peak, achieved occupancy, registers per thread and warp cycles per issued instruction (a lent
machine brings back at most 8 files: the summary travels in the log). Exits 0 with SKIPPED where
there is no GPU or no ncu.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

LABEL_PREFIX = "pf: "  # NVTX range names; the report parser finds a kernel's row by this
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "SchedulerStats",
            "MemoryWorkloadAnalysis")
# ncu's metric names in its details report -> the summary's columns
METRICS = {"Duration": "duration", "Compute (SM) Throughput": "sm_pct", "Memory Throughput": "mem_pct",
           "DRAM Throughput": "dram_pct", "Achieved Occupancy": "occupancy_pct",
           "Registers Per Thread": "registers", "Warp Cycles Per Issued Instruction": "cycles_per_issue"}
_UNIT_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6,
               "second": 1e6}


# ---- the workload ----

def _rows(device: torch.device, dtypes: Sequence[torch.dtype], variants: Sequence[str], max_batch: int
          ) -> Iterator[Tuple[str, Callable[[], Callable[[], object]]]]:
    """(label, make) per profiled call: make() builds the inputs, gradients and warm-ups and returns
    the call."""
    from . import e2e
    from .cases import OPS, BackendOps, all_cases
    from .report import short_dtype
    from .run import _leaves, _outputs

    backend = "cuda" if device.type == "cuda" else "cpu"
    ops = BackendOps(backend)

    def op_call(case, dtype, mode):
        inputs = case.make_inputs(device, dtype)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    case.call(ops, *inputs)
            return forward
        with torch.no_grad():
            shapes = [o.shape for o in _outputs(case.call(ops, *inputs))]
        grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        return lambda: torch.autograd.grad(_outputs(case.call(ops, *inputs)), _leaves(inputs), grads)

    def train_step(variant, B, T):
        dims = e2e.INPUTS[variant.inputs]
        torch.manual_seed(0)
        model = variant.build(dims).to(device)
        head = torch.nn.Linear(e2e.FUSED, 1).to(device)
        xs, y = e2e._inputs(device, dims, B, T)
        return e2e._Runner(model, head, xs, y, "train", e2e.E2EProvider(backend), device, variant.autocast).step

    for dtype in dtypes:
        for case in all_cases(quick=True, ops=OPS, device_type=device.type):
            if case.params["B"] > max_batch:
                continue
            for mode in ("fwd", "fwd+bwd"):
                label = f"{case.op} {case.label} {mode} {short_dtype(str(dtype))} {backend}"
                yield label, functools.partial(op_call, case, dtype, mode)
    for variant in e2e.select_variants(variants, quick=False) if variants else []:
        for B, T in variant.sizes:
            yield f"e2e {variant.name} B={B} T={T} train {backend}", functools.partial(train_step, variant, B, T)


@contextlib.contextmanager
def _profiled(label: str, device: torch.device):
    """The call between cudaProfilerStart/Stop (ncu --profile-from-start off profiles only there),
    inside an NVTX start/end range: process-wide, so the autograd engine's thread is inside it too."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.profiler.start()
    handle = torch.cuda.nvtx.range_start(LABEL_PREFIX + label)
    try:
        yield
        torch.cuda.synchronize(device)
    finally:
        torch.cuda.nvtx.range_end(handle)
        torch.cuda.profiler.stop()


def run_workload(device: torch.device, dtypes: Sequence[torch.dtype], variants: Sequence[str],
                 only: Optional[str] = None, max_batch: int = 256, print_fn: Callable[[str], None] = print,
                 seconds: float = float("inf")) -> List[str]:
    """Each row's call once, labelled; returns the labels in order (also printed). No row starts
    after `seconds`: the program must end for ncu to write its report, so it ends in time."""
    labels = []
    start = time.monotonic()
    for label, make in _rows(device, dtypes, variants, max_batch):
        if only and only not in label:
            continue
        if time.monotonic() - start > seconds:
            print_fn(f"rows from {label} on not profiled: past --workload-seconds {seconds:.0f}")
            break
        call = make()
        with _profiled(label, device):
            call()
        labels.append(label)
        print_fn(f"row {len(labels) - 1}: {label}")
    return labels


# ---- ncu and its report ----

def find_ncu() -> Optional[str]:
    found = shutil.which("ncu")
    if found:
        return found
    candidates = ["/usr/local/cuda/bin/ncu", *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)]
    return next((c for c in candidates if os.path.exists(c)), None)


def ncu_command(ncu: str, help_text: str, sections_known: str, log_file: str, workload: List[str]) -> List[str]:
    """ncu's arguments: the options this ncu has, the sections it knows (each checked first, so an
    older or newer ncu drops what it lacks rather than failing the run)."""
    args = [ncu, "--profile-from-start", "off", "--nvtx", "--kernel-name-base", "demangled",
            "--kernel-name", "regex:pf_kernels::", "--log-file", log_file]
    if "--clock-control" in help_text:
        args += ["--clock-control", "none"]  # the clocks as found: what the benchmarks see
    for section in SECTIONS:
        if re.search(rf"(^|\s){re.escape(section)}(\s|$)", sections_known, flags=re.MULTILINE):
            args += ["--section", section]
    return args + workload


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


_HEADER = re.compile(r"^\s{0,4}(\S.*?)\s+\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), (?:Context|Device)\b")
_METRIC = re.compile(r"^\s+(\S.*?)\s{2,}(\S+)\s+([-\d.,]+)\s*$")


def parse_report(text: str) -> List[dict]:
    """One dict per profiled kernel of ncu's text report: name, grid, block, label (its NVTX row, or
    None) and the METRICS found (duration in microseconds)."""
    kernels: List[dict] = []
    current: Optional[dict] = None
    in_sections = False
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.lstrip().startswith(("Section", "---")):
            grid = "x".join(header.group(i) for i in (2, 3, 4))
            block = "x".join(header.group(i) for i in (5, 6, 7))
            current = dict(name=header.group(1), grid=grid, block=block, label=None)
            kernels.append(current)
            in_sections = False
            continue
        if current is None:
            continue
        if "Section:" in line:
            in_sections = True
        if not in_sections and LABEL_PREFIX in line:
            current["label"] = re.split(r"[>\"]", line.split(LABEL_PREFIX, 1)[1])[0].strip()
            continue
        metric = _METRIC.match(line)
        if metric and metric.group(1) in METRICS:
            value = _number(metric.group(3))
            if value is None:
                continue
            key = METRICS[metric.group(1)]
            if key == "duration":
                value *= _UNIT_TO_US.get(metric.group(2), float("nan"))
            current.setdefault(key, value)
    return kernels


def short_kernel_name(name: str) -> str:
    """backproj_concat_fwd_kernel<...>(...) from ncu's demangled name."""
    name = re.sub(r"^void\s+", "", name).replace("(anonymous namespace)::", "")
    base = re.split(r"[<(]", name)[0]
    return base.rsplit("::", 1)[-1]


def summary_lines(kernels: List[dict], labels: Sequence[str]) -> List[str]:
    """One line per kernel, grouped by row (the rows' order), and each row's total duration."""
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "?"

    lines = [f"{'kernel':34s} {'grid x block':>18s} {'us':>8s} {'SM%':>5s} {'mem%':>5s} {'dram%':>5s} "
             f"{'occ%':>5s} {'regs':>4s} {'cyc/iss':>7s}"]
    unlabelled = not any(k["label"] for k in kernels)
    order = list(labels) + sorted({k["label"] for k in kernels if k["label"] and k["label"] not in labels})
    groups: Dict[Optional[str], List[dict]] = {}
    for k in kernels:
        groups.setdefault(None if unlabelled else k["label"], []).append(k)
    for label in ([None] if unlabelled else order + [None]):
        ks = groups.get(label, [])
        if not ks:
            continue
        total = sum(k.get("duration", 0.0) for k in ks)
        if label:
            title = label
        elif unlabelled:
            title = "(no NVTX labels in the report: kernels in launch order; the rows: " + "; ".join(labels) + ")"
        else:
            title = "(outside the labelled calls)"
        lines.append(f"## {title}: {len(ks)} kernels, {total:.2f} us")
        for k in ks:
            lines.append(f"{short_kernel_name(k['name'])[:34]:34s} {k['grid'] + ' x ' + k['block']:>18s} "
                         f"{fmt(k.get('duration'), '8.2f')} {fmt(k.get('sm_pct'), '5.1f')} "
                         f"{fmt(k.get('mem_pct'), '5.1f')} {fmt(k.get('dram_pct'), '5.1f')} "
                         f"{fmt(k.get('occupancy_pct'), '5.1f')} {fmt(k.get('registers'), '4.0f')} "
                         f"{fmt(k.get('cycles_per_issue'), '7.1f')}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="store_true", help="run the labelled calls only (ncu runs this)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--e2e", nargs="*", default=["pf-r3"], metavar="VARIANT",
                        help="end-to-end variants whose training step is profiled too (none: ops only)")
    parser.add_argument("--only", help="rows whose label holds this substring")
    parser.add_argument("--max-batch", type=int, default=256,
                        help="op rows up to this batch (default: the launch-bound ones; at B=4096 the kernels ran "
                             "near their memory floor, and ncu's replay of a 240 MB output is slow)")
    parser.add_argument("--out", default="results/profile")
    parser.add_argument("--timeout", type=int, default=150, help="seconds for the ncu run")
    parser.add_argument("--workload-seconds", type=float, default=None,
                        help="no row starts after this (default: --timeout less 40 s, for ncu's replays and report)")
    args = parser.parse_args(argv)
    from .run import DTYPES

    device = torch.device(args.device)
    dtypes = [DTYPES[d] for d in args.dtypes]
    if args.workload:
        run_workload(device, dtypes, args.e2e, args.only, args.max_batch,
                     seconds=args.workload_seconds if args.workload_seconds is not None else float("inf"))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.ncu: SKIPPED (torch sees no CUDA device)")
        return 0
    ncu = find_ncu()
    if ncu is None:
        print("benchmarks.ncu: SKIPPED (no ncu on PATH, in /usr/local/cuda/bin or /opt/nvidia/nsight-compute)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    report = os.path.join(args.out, "ncu.txt")
    help_text = subprocess.run([ncu, "--help"], capture_output=True, text=True).stdout
    sections = subprocess.run([ncu, "--list-sections"], capture_output=True, text=True).stdout
    workload = [sys.executable, "-m", "benchmarks.ncu", "--workload", "--device", args.device,
                "--dtypes", *args.dtypes, "--max-batch", str(args.max_batch), "--e2e", *args.e2e,
                "--workload-seconds", str(args.workload_seconds if args.workload_seconds is not None
                                          else max(10, args.timeout - 40)),
                *(["--only", args.only] if args.only else [])]
    command = ncu_command(ncu, help_text, sections, report, workload)
    print("$ " + " ".join(command), flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        # The partial output comes as bytes, even with text=True.
        partial = b"".join(p if isinstance(p, bytes) else p.encode() for p in (exc.stdout, exc.stderr) if p)
        output, rc = partial.decode(errors="replace") + f"\n[ncu timed out after {args.timeout} s]", 124
    labels = [m.group(1) for m in re.finditer(r"^row \d+: (.*)$", output, flags=re.MULTILINE)]
    text = open(report).read() if os.path.exists(report) else ""
    kernels = parse_report(text)
    print("\n".join(summary_lines(kernels, labels)))
    print(f"benchmarks.ncu: {len(kernels)} kernels profiled over {len(labels)} rows (exit {rc}); wrote {report}")
    if rc != 0:
        print(output[-3000:])
    return 0 if rc == 0 and kernels else 1


if __name__ == "__main__":
    sys.exit(main())
