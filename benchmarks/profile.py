"""What bounds each op: torch.profiler over each provider's call, one short per-kernel table per row.

    python -m benchmarks.profile --device cuda --dtype bf16 --out $OUT/profile
    python -m benchmarks.profile --ops backproj_concat --cases "B=4096" --providers eager triton
    python -m benchmarks.profile --ops --e2e pf-r3      # whole training steps and inference only

For each op on the --quick grid (or the rows whose label holds one of --cases), each provider
(eager and every fused backend, by default) and mode: the wall time per call (timed without the
profiler), the device time per call and the number of kernels per call, and the kernels: name,
launches per call, total and mean device time. A row where the device is busy a small share of
the wall time is bound by launches and host work; otherwise its device time is compared with the
floor max(bytes / copy bandwidth, FLOPs / matmul rate) measured in the same run. On a CPU the
"kernels" are the ops (aten::, pf_kernels::, autograd) by self CPU time.

With --e2e, whole end-to-end models first (benchmarks/e2e.py variants, each size, a training step and
inference, eager and auto by default): wall and device time per step, kernels per step, and on a GPU
the host side too (the ops by self CPU time), which says where a launch-bound step spends its time.
Writes profile.txt and profile.json into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import defaultdict
from typing import Dict, List

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from . import e2e
from .cases import EAGER, OPS, BackendOps, Case, all_cases
from .proof import ProvenCompile
from .report import short_dtype
from .run import DTYPES, _outputs, _rotating, device_name, fused_backends
from .timing import copy_bandwidth, error_text, matmul_rate, measure


def kernel_table(prof, device: torch.device, calls: int) -> List[dict]:
    """Per kernel (CUDA) or aten op (CPU): launches per call, total and mean time, by total time."""
    totals: Dict[str, List[float]] = defaultdict(list)
    for evt in prof.events():
        if device.type == "cuda":
            if evt.device_type == DeviceType.CUDA:
                totals[evt.name].append(evt.time_range.elapsed_us())
        elif evt.device_type == DeviceType.CPU and ("::" in evt.name or evt.name.startswith("cuda")):
            # aten, pf_kernels and autograd ops, and the CUDA runtime's calls (launches, syncs)
            totals[evt.name].append(evt.self_cpu_time_total)
    table = [dict(name=name, per_call=len(ts) / calls, total_us=sum(ts), mean_us=sum(ts) / len(ts))
             for name, ts in totals.items()]
    return sorted(table, key=lambda k: -k["total_us"])


def _wall_and_profile(run_once, device, calls: int, min_time_s: float):
    """The median seconds per call of run_once (timed without the profiler), then `calls` calls
    under torch.profiler."""
    wall = measure(run_once, device, min_time_s=min_time_s, warmup=3)["median_s"]
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        for _ in range(calls):
            run_once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return wall, prof


def _per_call(wall: float, kernels: List[dict], calls: int) -> dict:
    return dict(wall_us=wall * 1e6, device_us_per_call=sum(k["total_us"] for k in kernels) / calls,
                kernels_per_call=sum(k["per_call"] for k in kernels))


def profile_row(case: Case, provider: str, mode: str, dtype, device, calls: int, copy_gbps: float,
                matmul_gflops: float) -> dict:
    rotation = [case.make_inputs(device, dtype) for _ in range(2)]
    with torch.no_grad():
        shapes = [o.shape for o in _outputs(case.call(EAGER, *rotation[0]))]
    grads = [[torch.randn(s, device=device, dtype=dtype) for s in shapes] for _ in rotation]
    if provider == "compile":  # inductor's kernels for the same op: what the competitor does
        fn = ProvenCompile(lambda *a: case.call(EAGER, *a))
    else:
        ops = EAGER if provider == "eager" else BackendOps(provider)
        fn = (lambda *a: case.call(ops, *a))
    run_once = _rotating(fn, rotation, grads, mode)
    grad_mode = torch.no_grad() if mode == "fwd" else contextlib.nullcontext()
    row = dict(op=case.op, case=case.label, provider=provider, mode=mode, dtype=str(dtype))
    with grad_mode:
        try:
            if provider == "compile":
                fn.warm_up(run_once, times=2)
                if fn.check():
                    raise RuntimeError(fn.check())
            wall, prof = _wall_and_profile(run_once, device, calls, min_time_s=0.1)
        except Exception as exc:
            return dict(row, error=error_text(exc))
    kernels = kernel_table(prof, device, calls)
    memory_us = case.bytes(mode, dtype) / (copy_gbps * 1e9) * 1e6
    compute_us = case.flops(mode) / (matmul_gflops * 1e9) * 1e6
    row.update(_per_call(wall, kernels, calls), floor_us=max(memory_us, compute_us),
               floor_kind="memory" if memory_us >= compute_us else "compute",
               bytes=case.bytes(mode, dtype), flops=case.flops(mode), kernels=kernels)
    row["bound"] = _bound(row, device)
    return row


def profile_e2e_row(variant: e2e.Variant, B: int, T: int, task: str, provider: str, device, calls: int) -> dict:
    """One end-to-end model's step (task "train": forward, backward, Adam; or "inference") on one
    provider, as benchmarks/e2e.py times it; floor-less: what bounds it is the device's busy share."""
    row = dict(op=f"e2e {variant.name}", case=f"B={B} T={T}", provider=provider, mode=task,
               dtype="float32" + (f", {short_dtype(str(variant.autocast))} autocast" if variant.autocast else ""))
    try:
        known = e2e.e2e_providers(device, fused_backends(device), with_compile=True)
        if provider not in known:
            raise ValueError(f"no end-to-end provider {provider!r} on {device.type}; known: {', '.join(known)}")
        dims = e2e.INPUTS[variant.inputs]
        torch.manual_seed(0)
        model = variant.build(dims).to(device)
        head = torch.nn.Linear(e2e.FUSED, 1).to(device)
        xs, y = e2e._inputs(device, dims, B, T)
        runner = e2e._Runner(model, head, xs, y, task, known[provider], device, variant.autocast)
        if runner.status != "ok":
            raise RuntimeError(runner.status)
        wall, prof = _wall_and_profile(runner.step, device, calls, min_time_s=0.2)
    except Exception as exc:
        return dict(row, error=error_text(exc))
    kernels = kernel_table(prof, device, calls)
    row.update(_per_call(wall, kernels, calls), ran=runner.ran, floor_us=None, kernels=kernels)
    if device.type == "cuda":  # a launch-bound step: where the host's time goes
        row["host"] = kernel_table(prof, torch.device("cpu"), calls)
    row["bound"] = _bound(row, device)
    return row


def _bound(row: dict, device) -> str:
    if device.type != "cuda":
        if row["floor_us"] is None:
            return f"CPU: {row['kernels_per_call']:.0f} ops per step"
        return f"CPU: wall {row['wall_us'] / max(row['floor_us'], 1e-9):.1f}x the {row['floor_kind']} floor"
    busy = row["device_us_per_call"] / max(row["wall_us"], 1e-9)
    if busy < 0.6:
        return (f"launch/host-bound: the device is busy {busy:.0%} of the wall time "
                f"({row['kernels_per_call']:.0f} kernels per call)")
    if row["floor_us"] is None:
        return f"device-bound ({busy:.0%} busy)"
    return (f"device-bound ({busy:.0%} busy): device time {row['device_us_per_call'] / max(row['floor_us'], 1e-9):.2f}x "
            f"the {row['floor_kind']} floor")


def format_row(row: dict, top: int) -> str:
    title = f"{row['op']} {row['case']} {row['mode']} {short_dtype(row['dtype'])} {row['provider']}"
    if "error" in row:
        return f"## {title}\n  error: {row['error']}"
    floor = "" if row["floor_us"] is None else \
        f", floor {row['floor_us']:.1f} us ({row['bytes'] / 1e6:.2f} MB, {row['flops'] / 1e6:.1f} MFLOP)"
    lines = [f"## {title}" + (f" (ran: {row['ran']})" if row.get("ran") else ""),
             f"  wall {row['wall_us']:.1f} us/call, device {row['device_us_per_call']:.1f} us/call, "
             f"{row['kernels_per_call']:.1f} kernels/call{floor}",
             f"  bound: {row['bound']}"]
    for heading, table in (("kernel", row["kernels"]), ("host op (self CPU time)", row.get("host"))):
        if table is None:
            continue
        lines.append(f"  {heading:70s} {'per call':>8s} {'total us':>10s} {'mean us':>9s}")
        for k in table[:top]:
            lines.append(f"  {k['name'][:70]:70s} {k['per_call']:8.1f} {k['total_us']:10.1f} {k['mean_us']:9.2f}")
        if len(table) > top:
            lines.append(f"  ... {len(table) - top} more")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS, help="ops to profile (none: e2e only)")
    parser.add_argument("--e2e", nargs="+", metavar="VARIANT", default=[],
                        help="end-to-end variants to profile first (benchmarks/e2e.py VARIANTS), every size")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--cases", nargs="+", help="label substrings, e.g. 'B=4096' (default: the --quick grid)")
    parser.add_argument("--providers", nargs="+",
                        help="default: eager and every fused backend of the device (e2e: eager and auto); "
                             "'compile' adds inductor's kernels, 'cudagraph' (e2e) the captured step")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per row")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per row")
    parser.add_argument("--time-limit", type=float, metavar="S", help="rows not started after S seconds are left out")
    parser.add_argument("--out", default="results/profile")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cases = all_cases(quick=not args.cases, ops=args.ops, device_type=device.type)
    if args.cases:
        cases = [c for c in cases if any(s in c.label for s in args.cases)]
    providers = args.providers or ["eager", *fused_backends(device)]
    copy_gbps = copy_bandwidth(device)
    mm = matmul_rate(device, dtype)
    meta = dict(device=str(device), device_name=device_name(device), torch=torch.__version__, dtype=str(dtype),
                threads=torch.get_num_threads(), copy_gbps=copy_gbps, matmul_gflops=mm, calls=args.calls)
    def out_of_time() -> bool:
        return bool(args.time_limit) and time.perf_counter() - started > args.time_limit

    rows = []
    for variant in e2e.select_variants(args.e2e, quick=False) if args.e2e else []:
        for B, T in variant.sizes:
            for task in ("train", "inference"):
                for provider in args.providers or ["eager", "auto"]:
                    if out_of_time():
                        rows.append(dict(op=f"e2e {variant.name}", case=f"B={B} T={T}", provider=provider,
                                         mode=task, dtype="float32", error="skipped (time limit)"))
                        continue
                    rows.append(profile_e2e_row(variant, B, T, task, provider, device, args.calls))
    for case in cases:
        for mode in args.modes:
            for provider in providers:
                if out_of_time():
                    rows.append(dict(op=case.op, case=case.label, provider=provider, mode=mode, dtype=str(dtype),
                                     error="skipped (time limit)"))
                    continue
                rows.append(profile_row(case, provider, mode, dtype, device, args.calls, copy_gbps, mm))
    os.makedirs(args.out, exist_ok=True)
    title = (f"{meta['device_name']} ({device}), torch {meta['torch']}, {short_dtype(str(dtype))}, {meta['threads']} threads; "
             f"measured now: copy {copy_gbps:.1f} GB/s, matmul {mm:.0f} GFLOP/s; {args.calls} profiled calls per row")
    text = "\n\n".join([title, *(format_row(r, args.top) for r in rows)])
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    # The console gets one line per row (the reply of a GPU run carries only the end of the output).
    for r in rows:
        what = f"{r['op']:15s} {r['case']:20s} {r['mode']:7s} {r['provider']:7s}"
        print(f"{what} " + (f"error {r['error'][:80]}" if "error" in r else
                            f"wall {r['wall_us']:9.1f} us  device {r['device_us_per_call']:9.1f} us  "
                            f"{r['kernels_per_call']:4.1f} kernels  {r['bound']}"))
    print(f"wrote {os.path.join(args.out, 'profile.txt')} and profile.json")


if __name__ == "__main__":
    main()
