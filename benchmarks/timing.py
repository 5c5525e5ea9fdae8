"""Timing that is honest on a noisy machine: warm-up, many repeats, median with 20th/80th percentiles."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(times) -> Dict[str, float]:
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "reps": len(times)}


def measure_side_by_side(fns: Dict[str, Callable[[], object]], device: torch.device, min_time_s: float = 0.2,
                         min_reps: int = 5, max_reps: int = 200, warmup: int = 3) -> Dict[str, Dict[str, float]]:
    """Seconds per call of each fn: median, p20, p80 (CUDA events on a GPU, perf_counter on CPU).

    The fns run in rounds, one call each per round, so that a slow spell of a shared machine hits
    every provider alike and the ratios stay honest. min_time_s is per fn.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    reps, start_all = 0, time.perf_counter()
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start_all < min_time_s * len(fns)):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
        reps += 1
    return {name: _stats(t) for name, t in times.items()}


def measure(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2, min_reps: int = 5,
            max_reps: int = 200, warmup: int = 3) -> Dict[str, float]:
    """Seconds per call of one fn (see measure_side_by_side)."""
    return measure_side_by_side({"fn": fn}, device, min_time_s, min_reps, max_reps, warmup)["fn"]


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """This device's copy bandwidth in GB/s (bytes read + written), measured now."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device, min_time_s=0.5, min_reps=10)
    return 2 * src.numel() * 4 / stats["median_s"] / 1e9
