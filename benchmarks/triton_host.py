"""Host time of the triton backend's calls, measured on a machine without a GPU.

    python -m benchmarks.triton_host [--ops fusion_head ...] [--profile] [--calls N]

A stand-in Triton driver reports an sm_90 target, so the kernels compile for real (ptxas), and its
launcher does nothing: what is timed is everything the host does per call (torch.library's
custom-op layers, autograd, pf_kernels' launch helpers, Triton's autotuner and binder) and nothing
the GPU does. On a GPU these calls are host-bound wherever this time exceeds the kernels' own, as
at the launch-bound sizes (the H100 run measured the triton backend at 0.2-0.4x eager there). Run
in its own process: the stand-in must be Triton's driver before pf_kernels.triton is imported.
CPU tensors stand in for the device's; eager PyTorch's time for the same math on those CPU tensors
is printed beside, as a scale, not as a competitor.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import time


def install_stand_in_driver(launches: bool = True):
    """Makes the active Triton driver one that reports an sm_90 target (so kernels compile for it) and
    returns it. launches=True: a launch only counts (`launched`) and autotuning times every config
    alike. launches=False: building a launcher or benchmarking raises, for callers that must only
    trace (tests/test_triton_graph.py). Must be active before anything asks triton for its driver."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    def refuse(what):
        raise RuntimeError(f"the stand-in driver cannot {what} (installed with launches=False)")

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 32, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    class StandIn(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def __init__(self):
            self.utils = Utils()
            self.launched = 0

        def launcher_cls(self, src, metadata):
            if not launches:
                refuse("build launchers")

            def launch(*args):  # where the C launcher would start the kernel
                self.launched += 1
            return launch

        def map_python_to_cpp_type(self, ty):
            return ty if launches else refuse("build launchers")

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_benchmarker(self):  # autotuning: every config "takes" the same time
            if not launches:
                refuse("benchmark")

            def bench(fn, quantiles=None, **kwargs):
                fn()
                return [1.0, 1.0, 1.0] if quantiles else 1.0
            return bench

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def get_empty_cache_for_benchmark(self):
            return torch.empty(16)

        def clear_cache(self, cache):
            pass

    stand_in = StandIn()
    driver.set_active(stand_in)
    return stand_in


def _median_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="*", default=None, help="default: every op")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per op and mode")
    parser.add_argument("--profile", choices=("fwd", "fwd+bwd"), default=None,
                        help="cProfile these calls: the functions by their own time")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("PF_KERNELS_SKIP_EXTENSION", "1")  # only the triton backend is used
    stand_in = install_stand_in_driver()
    import torch
    import torch.nn.functional as F

    import pf_kernels.triton as triton_backend

    torch.manual_seed(0)
    B, dims, Dz, T, Dc, H = 8, (128, 64, 32), 128, 50, 32, 64  # "typical", launch-bound on a GPU

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    hs, w, b = [leaf(B, d) for d in dims], leaf(Dz, sum(dims)), leaf(Dz)
    xs, z = [leaf(B, T, d) for d in dims], leaf(B, Dz)
    bws, bbs = [leaf(Dc, Dz) for _ in dims], [leaf(Dc) for _ in dims]
    p, pw = leaf(B, T, H), leaf(H, Dc)
    ps, pws = [leaf(B, T, H) for _ in dims], [leaf(H, Dc) for _ in dims]

    def context(j):
        return F.relu(F.linear(z, bws[j], bbs[j]))[:, None].expand(B, T, Dc)

    def hoisted_composed():
        zz = triton_backend.fusion_head(hs, w, b, "relu")
        return [zz, *(triton_backend.context_linear(q, zz, bws[j], bbs[j], v, "relu", "relu")
                      for j, (q, v) in enumerate(zip(ps, pws)))]

    ops = {  # op: (the triton backend's call, eager PyTorch's on the same CPU tensors)
        "fusion_head": (lambda: triton_backend.fusion_head(hs, w, b, "relu"),
                        lambda: F.relu(F.linear(torch.cat(hs, -1), w, b))),
        "backproj_concat": (lambda: triton_backend.backproj_concat(xs[0], z, bws[0], bbs[0], "relu"),
                            lambda: torch.cat([xs[0], context(0)], -1)),
        "context_linear": (lambda: triton_backend.context_linear(p, z, bws[0], bbs[0], pw, "relu", "relu"),
                           lambda: F.relu(p + F.linear(context(0)[:, :1], pw))),
        "refine_step": (lambda: triton_backend.refine_step(hs, w, b, xs, bws, bbs, "relu", "relu"),
                        lambda: [torch.cat([x, context(j)], -1) for j, x in enumerate(xs)]),
        # the hoisted step in one launch, and composed of the ops it replaces
        "refine_step_hoisted": (lambda: triton_backend.refine_step_hoisted(hs, w, b, ps, bws, bbs, pws, "relu", "relu",
                                                                           ["relu"] * len(ps)),
                                lambda: [F.relu(q + F.linear(context(j)[:, :1], v)) for j, (q, v) in
                                         enumerate(zip(ps, pws))]),
        "hoisted_composed": (hoisted_composed, lambda: [F.relu(q + F.linear(context(j)[:, :1], v)) for j, (q, v) in
                                                        enumerate(zip(ps, pws))]),
    }
    leaves = [*hs, w, b, *xs, z, *bws, *bbs, p, pw, *ps, *pws]
    print(f"host time per call, stand-in driver (sm_90, nothing launched), torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}; B={B} T={T} dims={dims} Dz={Dz} Dc={Dc} H={H}")
    for name in args.ops or list(ops):
        call, eager = ops[name]

        def outputs(result):
            flat = []
            for r in (result if isinstance(result, (tuple, list)) else [result]):
                flat.extend(r if isinstance(r, (tuple, list)) else [r])
            return flat

        def fwd_bwd():
            out = outputs(call())
            torch.autograd.grad(out, leaves, [torch.ones_like(o) for o in out], allow_unused=True)

        fwd_bwd()  # compiles and autotunes
        with torch.no_grad():
            call()
            stand_in.launched = 0
            call()
            fwd_launches = stand_in.launched
            t_fwd, t_eager = _median_us(call, args.calls), _median_us(eager, args.calls)
        stand_in.launched = 0
        fwd_bwd()
        all_launches = stand_in.launched
        t_all = _median_us(fwd_bwd, max(10, args.calls // 4))
        print(f"{name:16s} fwd {t_fwd:8.1f} us, {fwd_launches} launches ({t_fwd / max(fwd_launches, 1):6.1f} us "
              f"each) | fwd+bwd {t_all:8.1f} us, {all_launches} launches | eager fwd on CPU {t_eager:7.1f} us")
        if args.profile:
            prof = cProfile.Profile()
            with torch.no_grad() if args.profile == "fwd" else contextlib.nullcontext():
                prof.enable()
                for _ in range(args.calls):
                    call() if args.profile == "fwd" else fwd_bwd()
                prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
            print(text.getvalue())


if __name__ == "__main__":
    main()
