"""Timing that is honest on a noisy machine: warm-up, many repeats, median with 20th/80th percentiles."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2, min_reps: int = 5,
            max_reps: int = 200, warmup: int = 3) -> Dict[str, float]:
    """Seconds per call of fn: median, p20, p80 over repeats (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < min_time_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "reps": len(times)}


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """This device's copy bandwidth in GB/s (bytes read + written), measured now."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device, min_time_s=0.5, min_reps=10)
    return 2 * src.numel() * 4 / stats["median_s"] / 1e9
