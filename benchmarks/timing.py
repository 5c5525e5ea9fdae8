"""Timing that is honest on a noisy machine and on an asynchronous GPU.

A GPU sample is a batch of back-to-back calls between two CUDA events (the device is idle when it
starts, so launch gaps count); a CPU sample is one call between perf_counter readings. Callers run in
rounds, one sample each per round, so that a slow spell of a shared machine hits all alike; the
order rotates from round to round. Medians
with 20th/80th percentiles. Warm-up (compiles, autotuning, allocator growth) is outside the samples,
and so is Python's garbage collector (off while sampling).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds for `calls` back-to-back calls of fn, starting from an idle device."""
    sync(device)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def stats(per_call_times, calls_per_sample: int = 1) -> Dict[str, float]:
    times = list(per_call_times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "reps": len(times),
            "calls_per_sample": calls_per_sample}


# A GPU sample lasts at least this long: back-to-back calls let the host run ahead as in a training
# loop, and an event pair resolves about a microsecond. A CPU sample is one call: on a shared
# machine a longer sample is more often cut by preemption, and the median of single calls skips those.
SAMPLE_S = {"cuda": 1e-3}
MAX_CALLS_PER_SAMPLE = 100


def calls_per_sample(fn: Callable[[], object], device: torch.device) -> int:
    target = SAMPLE_S.get(device.type)
    if not target:
        return 1
    one = time_calls(fn, device, 1)
    return int(min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(target / max(one, 1e-9)))))


class Failed(Exception):
    """A caller raised during timing; the row is marked with this, not timed."""


def measure_side_by_side(fns: Dict[str, Callable[[], object]], device: torch.device, min_time_s: float = 0.2,
                         min_reps: int = 5, max_reps: int = 200, warmup: int = 2
                         ) -> Dict[str, Dict[str, object]]:
    """Seconds per call of each fn: median, p20, p80 over samples (see the module's docstring).

    min_time_s is per fn. A fn that raises (in warm-up or later) is dropped from the rounds and its
    entry is {"error": "<Type>: <message>"} instead of numbers.
    """
    results: Dict[str, Dict[str, object]] = {}
    live: Dict[str, Callable[[], object]] = {}
    calls: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            calls[name] = calls_per_sample(fn, device)
            live[name] = fn
        except Exception as exc:  # the row says why; the other providers are still timed
            results[name] = {"error": error_text(exc)}
    times = {name: [] for name in live}
    reps, start = 0, time.perf_counter()
    budget = min_time_s * max(len(live), 1)
    # No garbage collection inside the samples (as timeit): a collection lands in whichever provider
    # happens to run then, a host-side pause of its own.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while live and reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget):
            # Each round starts at the next provider: none always runs first or right after another
            # (measured here: the provider timed just after eager ran ~20% slower than its twin after it).
            names = list(live)
            shift = reps % len(names)
            for name in names[shift:] + names[:shift]:
                try:
                    times[name].append(time_calls(live[name], device, calls[name]) / calls[name])
                except Exception as exc:
                    results[name] = {"error": error_text(exc)}
                    del live[name]
            reps += 1
    finally:
        if was_enabled:
            gc.enable()
    for name in live:
        results[name] = stats(times[name], calls[name])
    return {name: results[name] for name in fns}


def measure(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2, min_reps: int = 5,
            max_reps: int = 200, warmup: int = 2) -> Dict[str, object]:
    """Seconds per call of one fn (see measure_side_by_side); raises Failed if it raised."""
    result = measure_side_by_side({"fn": fn}, device, min_time_s, min_reps, max_reps, warmup)["fn"]
    if "error" in result:
        raise Failed(result["error"])
    return result


def error_text(exc: BaseException) -> str:
    """An exception as one line for a result row: its type and the start of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """This device's copy bandwidth in GB/s (bytes read + bytes written), measured now: the roofline
    of a memory-bound op such as backproj_concat."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), device, min_time_s=0.3, min_reps=10)
    return 2 * src.numel() * 4 / result["median_s"] / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """This device's dense matmul rate in GFLOP/s for dtype through torch.mm (cuBLAS / the CPU BLAS),
    measured now: the ceiling of a FLOP-bound row. fp32 at the precision every provider runs with."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    result = measure(lambda: torch.mm(a, b), device, min_time_s=0.2, min_reps=5)
    return 2 * n ** 3 / result["median_s"] / 1e9


def host_floor(device: torch.device) -> Dict[str, float]:
    """Seconds per call of the cheapest op from Python here (x * 2 on 8 elements), alone and under
    torch.autograd.grad: fixed costs that every provider's row pays. On a GPU the first is a launch;
    the second adds autograd's engine, which hands the backward to its device thread and back, so a
    fwd+bwd row can be no faster than it whatever its kernels do."""
    x = torch.randn(8, device=device, requires_grad=True)
    g = torch.randn(8, device=device)

    def forward():
        with torch.no_grad():
            return x.mul(2)

    timed = measure_side_by_side({"fwd": forward, "fwd+bwd": lambda: torch.autograd.grad(x.mul(2), x, g)}, device,
                                 min_time_s=0.1, min_reps=10)
    return {f"one_op_{mode.replace('+', '_')}_s": r["median_s"] for mode, r in timed.items() if "median_s" in r}


def floor_seconds(bytes_moved: int, flops: int, copy_gbps: float, matmul_gflops: Optional[float]) -> float:
    """The larger of bytes / copy bandwidth and FLOPs / matmul rate: no version runs much faster."""
    memory = bytes_moved / (copy_gbps * 1e9)
    compute = flops / (matmul_gflops * 1e9) if matmul_gflops else 0.0
    return max(memory, compute)
