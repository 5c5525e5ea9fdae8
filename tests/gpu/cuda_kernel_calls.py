"""Tiny calls of every CUDA kernel of pf_kernels._C, forward and backward, in every dtype (fp64, fp32,
fp16, bf16) and down every code path (the copy kernel with the context inline or from a GEMM, 16-byte
vectors or scalars, one or several shared-memory chunks, one or several tasks per batch row and per
block; the backward in one pass or split, act' from the output, inline y or a GEMM's y; fusion_head on
WMMA or SIMT with 32- or 64-wide tiles or on cuBLAS with its epilogue pass, more than 8 inputs, empty
inputs, B = 0; its backward in one fused launch or on cuBLAS, act' from the output or from y; both
fusion_head paths also forced on the same small shapes; context_linear with 16-byte or scalar access,
its backward in one pass or split, act' from the output or from p), each compared with the reference
(float64 on the CPU, so no torch kernel runs on the GPU for it). One line per call; exit status 1 on
any mismatch or on a code path left uncovered.

Made for compute-sanitizer (a few seconds of GPU work, ~180 calls), e.g.
    compute-sanitizer --tool memcheck --kernel-name kns=pf_kernels --error-exitcode 1 \\
        python tests/gpu/cuda_kernel_calls.py
Without a GPU it says SKIPPED and exits 0. `--plan-only [--sm-count N]` checks on any machine, from
the kernels' launch arithmetic (pf_kernels::_launch_plan), that the calls cover every code path.
`--only TEXT` runs the calls whose line contains TEXT (e.g. `--only "gemm 3 chunks"`), `--verbose`
prints each call's line before it runs: with CUDA_LAUNCH_BLOCKING=1 a fault then names its call and op."""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
MAX_GRID_ENV = "PF_KERNELS_CUDA_MAX_GRID"

# (label, B, positions, Dx, Dz, Dc, layout, activation or None: rotate). layout: contig, strided
# (non-contiguous z and W, permuted or strided x), offset (x a view one element into wider rows).
BACKPROJ = [
    ("inline vector", 3, (5,), 8, 6, 16, "contig", None),
    ("inline scalar", 3, (5,), 5, 6, 7, "strided", None),
    ("inline unaligned view", 2, (5,), 16, 6, 8, "offset", "tanh"),
    ("inline many tasks, split backward", 2, (600,), 8, 48, 64, "contig", "gelu"),
    ("inline 3 chunks", 2, (3,), 4, 2, 4100, "contig", None),
    ("gemm vector", 2, (3,), 8, 130, 256, "contig", "sigmoid"),
    ("gemm scalar", 2, (3,), 5, 130, 255, "strided", None),
    ("gemm 3 chunks", 2, (3,), 8, 40, 4104, "contig", "tanh"),
    ("gemm split backward", 2, (300,), 8, 200, 300, "contig", "gelu"),
    ("no positions", 70, (), 16, 33, 8, "contig", None),
    ("two position dims", 3, (4, 5), 6, 5, 7, "strided", None),
    ("Dx = 0", 2, (3,), 0, 5, 3, "contig", None),
    ("Dz = 0", 2, (3,), 4, 0, 6, "contig", "gelu"),
    ("Dc = 0", 2, (3,), 4, 5, 0, "contig", None),
    ("B = 0", 0, (5,), 4, 6, 3, "contig", None),
]
# (label, B, dims, Dz, layout, activation or None)
FUSION = [
    ("small tiles", 4, (5, 3), 6, "contig", None),
    ("odd widths, strided", 17, (16, 1, 31, 8), 13, "strided", None),
    ("several k tiles", 130, (64, 100), 70, "strided", "gelu"),
    ("64-wide tiles", 1100, (24, 9), 600, "contig", None),
    ("K > 8 inputs", 65, tuple(range(1, 11)), 17, "contig", None),
    ("cuBLAS forward, fused backward", 5, (700, 600), 9, "strided", None),
    ("cuBLAS forward, one input", 3, (1300,), 7, "strided", None),
    ("many rows, cuBLAS backward", 2100, (24, 9), 60, "contig", None),
    ("an empty input", 3, (0, 5), 4, "contig", None),
    ("B = 0", 0, (3, 5), 4, "contig", None),
]
# (label, B, positions, H, Dz, Dc, layout, activation or None) of context_linear; its output
# activation rotates. layout: contig, strided (p, z strided, bp_weight transposed; proj_weight is
# always a column slice of a wider Linear weight), offset (p a view one element into wider rows).
CONTEXT = [
    ("vector", 3, (5,), 16, 6, 8, "contig", None),
    ("scalar, strided", 3, (5,), 5, 6, 7, "strided", None),
    ("unaligned view", 2, (5,), 16, 6, 8, "offset", "tanh"),
    ("split backward", 2, (600,), 8, 48, 16, "contig", "gelu"),
    ("no positions", 70, (), 16, 33, 8, "contig", None),
    ("two position dims", 3, (4, 5), 6, 5, 7, "strided", None),
    ("B = 0", 0, (5,), 4, 6, 3, "contig", None),
]
# Rerun with the grid capped at 3 blocks: each block loops over several tasks (as past 2^31 - 1).
CAPPED = ("inline many tasks, split backward", "gemm 3 chunks", "gemm split backward", "inline 3 chunks",
          "odd widths, strided", "64-wide tiles", "several k tiles", "many rows, cuBLAS backward", "split backward",
          "two position dims")
# Rerun fusion_head with the plan's choice forced (PF_KERNELS_CUDA_PATH, read per call): cuBLAS and its
# epilogues on the launch-bound sizes, our kernels on the sizes the plan gives to cuBLAS.
PATH_ENV = "PF_KERNELS_CUDA_PATH"
FORCED = {
    "cublas": ("small tiles", "odd widths, strided", "several k tiles", "K > 8 inputs", "an empty input", "B = 0"),
    "kernel": ("cuBLAS forward, fused backward", "cuBLAS forward, one input", "many rows, cuBLAS backward"),
}
# backproj_concat's context likewise: from a GEMM where the plan computes it inline, and the reverse.
FORCED_BACKPROJ = {
    "cublas": ("inline vector", "inline 3 chunks", "two position dims"),
    "kernel": ("gemm vector", "gemm 3 chunks", "gemm split backward"),
}

REQUIRED_PATHS = {
    "fwd:inline", "fwd:gemm", "fwd:vector", "fwd:scalar", "fwd:chunks>1", "fwd:tasks/row>1",
    "bwd:one pass", "bwd:split", "bwd:y from output", "bwd:y inline", "bwd:y from gemm", "grid:capped",
    "fusion:wmma32", "fusion:wmma64", "fusion:simt32", "fusion:simt64", "fusion:K>8",
    "fusion:cublas", "fusion:cublas epilogue", "fusion:cublas y epilogue",
    "fusion bwd:y from output", "fusion bwd:y", "fusion bwd:fused", "fusion bwd:fused y", "fusion bwd:cublas",
    "fusion bwd:cublas y", "forced:cublas", "forced:kernel", "B=0", "Dx=0", "Dz=0", "Dc=0",
    "context fwd:vector", "context fwd:scalar", "context bwd:one pass", "context bwd:split",
    "context bwd:grad_out is grad_p", "context bwd:act' from output", "context bwd:act' from p",
}


def plan(what, *args):
    return torch.ops.pf_kernels._launch_plan(what, [int(a) for a in args])


def backproj_args(B, S, Dx, Dz, Dc, layout, bias, dtype, device):
    from tests.cases import backproj_inputs
    x, z, w, b = backproj_inputs(B, S, Dx, Dz, Dc, bias, dtype, device, noncontiguous=layout == "strided",
                                 weight_scale=1.0 if Dz == 0 else None)
    if layout == "offset":  # rows start one element into wider rows: never 16-byte aligned
        x = torch.randn(B, *S, Dx + 1, dtype=torch.float64, device=device).to(dtype)[..., 1:].requires_grad_()
    return x, z, w, b


def backproj_paths(x, Dz, Dc, activation, sm_count, forced=None):
    """forced: None (the plan's choice), "kernel" or "cublas" (PF_KERNELS_CUDA_PATH)."""
    B, Dx = x.shape[0], x.shape[-1]
    P = 1
    for size in x.shape[1:-1]:
        P *= size
    paths = set()
    for name, size in (("B", B), ("Dx", Dx), ("Dz", Dz), ("Dc", Dc)):
        if size == 0:
            paths.add(f"{name}=0")
    if B == 0 or P == 0 or Dx + Dc == 0:
        return paths
    inline, _, _, tasks_per_row, _, _ = plan("backproj_forward", B, P, Dx, Dz, Dc, sm_count)
    if forced and Dc > 0 and Dz > 0:
        inline = forced == "kernel"
        paths.add(f"forced:{forced}")
    paths.add("fwd:inline" if inline else "fwd:gemm")
    rows = x.reshape(B * P, Dx)
    if Dx > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    stride = rows.stride(0) if Dx > 0 else 0
    vector = plan("backproj_vector_ok", Dx, Dc, stride, rows.data_ptr() % 16, 0, x.element_size())[0]
    paths.add("fwd:vector" if vector else "fwd:scalar")
    if Dc > 2048:
        paths.add("fwd:chunks>1")
    if tasks_per_row > 1:
        paths.add("fwd:tasks/row>1")
    if Dc > 0:
        from_y = activation == "gelu" or (x.element_size() == 2 and activation in ("tanh", "sigmoid"))
        bwd = plan("backproj_backward", B, P, Dz, Dc, from_y, sm_count)
        paths.add("bwd:split" if bwd[1] > 1 else "bwd:one pass")
        paths.add(("bwd:y from output", "bwd:y from gemm", "bwd:y inline")[bwd[7]])
    return paths


def fusion_paths(hs, Dz, activation, bias, dtype, sm_count, forced=None):
    """forced: None (the plan's choice), "kernel" or "cublas" (PF_KERNELS_CUDA_PATH)."""
    B, widths, elem = hs[0].shape[0], [h.shape[1] for h in hs], hs[0].element_size()
    sixteen = dtype in (torch.float16, torch.bfloat16)  # WMMA: sm_80+ (every GPU this is checked on)
    from_y = activation == "gelu" or (sixteen and activation in ("tanh", "sigmoid"))
    paths = {"B=0"} if B == 0 else set()
    if forced:
        paths.add(f"forced:{forced}")
    fused = plan("fusion_head_backward", B, Dz, bias, from_y, elem, sm_count, *widths)[0]
    fused = (forced == "kernel" if forced else fused) and len(hs) <= 8  # more inputs: always cuBLAS
    paths.add("fusion bwd:fused" if fused else "fusion bwd:cublas")
    if from_y and B > 0:
        paths.add("fusion bwd:fused y" if fused else "fusion bwd:cublas y")
    if B == 0:
        return paths
    paths.add("fusion bwd:y" if from_y else "fusion bwd:y from output")
    gemm = plan("fusion_head_path", B, Dz, elem, sixteen, activation != "none", sm_count, *widths)[0]
    if (forced == "cublas") if forced else gemm:
        paths.add("fusion:cublas")
        if activation == "relu":
            paths.add("fusion:cublas epilogue")
        elif activation != "none":
            paths.add("fusion:cublas y epilogue")
        return paths
    tile = plan("fusion_head", B, Dz, sm_count)[0]
    paths.add(f"fusion:{'wmma' if sixteen else 'simt'}{tile}")
    if len(hs) > 8:
        paths.add("fusion:K>8")
    return paths


def context_args(B, S, H, Dz, Dc, layout, bias, dtype, device):
    from tests.cases import context_inputs
    args = context_inputs(B, S, H, Dz, Dc, bias, dtype, device, noncontiguous=layout == "strided")
    if layout == "offset":  # rows start one element into wider rows: never 16-byte aligned
        p = torch.randn(B, *S, H + 1, dtype=torch.float64, device=device).to(dtype)[..., 1:].requires_grad_()
        args = (p, *args[1:])
    return args


def context_paths(p, out_activation, sm_count):
    B, H = p.shape[0], p.shape[-1]
    P = 1
    for size in p.shape[1:-1]:
        P *= size
    if B == 0 or P == 0 or H == 0:
        return {"B=0"} if B == 0 else set()
    rows = p.reshape(B * P, H)
    if H > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    # the kernels use backproj_concat's vector rule (Dc = 0) and its backward reduction plan (Dc = H)
    vector = plan("backproj_vector_ok", H, 0, rows.stride(0), rows.data_ptr() % 16, 0, p.element_size())[0]
    splits = plan("backproj_backward", B, P, 0, H, 0, sm_count)[1]
    if out_activation == "none":
        source = "grad_out is grad_p"
    elif out_activation == "gelu" or p.element_size() == 2:
        source = "act' from p"
    else:
        source = "act' from output"
    return {f"context fwd:{'vector' if vector else 'scalar'}", f"context bwd:{'split' if splits > 1 else 'one pass'}",
            f"context bwd:{source}"}


def on_cpu(fn):
    """fn on CPU copies of the arguments, its outputs moved back: the reference runs no GPU kernel."""
    def run(*args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        out = fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        return out.to(device)
    return run


def calls(device, sm_count):
    """Yields (label, paths, env, check): check() runs the call under the environment variables env and
    compares it (GPU only)."""
    from tests.cases import (assert_matches_reference, backproj_call, context_call, fusion_call,
                             fusion_inputs)
    variants = [("", None, {}), (" grid<=3", None, {MAX_GRID_ENV: "3"})]
    variants += [(f" path={forced}", forced, {PATH_ENV: forced}) for forced in FORCED]
    for suffix, forced, env in variants:
        capped = MAX_GRID_ENV in env
        dtypes = (torch.float32, torch.bfloat16) if capped else DTYPES
        for i, (label, B, S, Dx, Dz, Dc, layout, act) in enumerate(BACKPROJ):
            if (capped and label not in CAPPED) or (forced and label not in FORCED_BACKPROJ[forced]):
                continue
            for j, dtype in enumerate((torch.float32, torch.bfloat16) if forced else dtypes):
                activation = act or ACTIVATIONS[(i + j) % len(ACTIVATIONS)]
                bias = (i + j) % 2 == 0
                args = backproj_args(B, S, Dx, Dz, Dc, layout, bias, dtype, device)
                paths = backproj_paths(args[0], Dz, Dc, activation, sm_count, forced) | (
                    {"grid:capped"} if capped else set())
                name = (f"backproj_concat {label}: B={B} S={S} Dx={Dx} Dz={Dz} Dc={Dc} {layout} {activation} "
                        f"bias={bias} {str(dtype)[6:]}{suffix}")
                yield name, paths, env, lambda a=args, act_=activation: assert_matches_reference(
                    backproj_call("cuda", act_), on_cpu(backproj_call("torch", act_)), a)
        for i, (label, B, dims, Dz, layout, act) in enumerate(FUSION):
            if (capped and label not in CAPPED) or (forced and label not in FORCED[forced]):
                continue
            for j, dtype in enumerate(dtypes):
                activation = act or ACTIVATIONS[(i + j) % len(ACTIVATIONS)]
                bias = (i + j) % 2 == 1
                hs, w, b = fusion_inputs(B, dims, Dz, bias, dtype, device, noncontiguous=layout == "strided")
                paths = fusion_paths(hs, Dz, activation, bias, dtype, sm_count, forced) | (
                    {"grid:capped"} if capped else set())
                name = (f"fusion_head {label}: B={B} dims={dims} Dz={Dz} {layout} {activation} bias={bias} "
                        f"{str(dtype)[6:]}{suffix}")
                yield name, paths, env, lambda a=(w, b, *hs), act_=activation: assert_matches_reference(
                    fusion_call("cuda", act_), on_cpu(fusion_call("torch", act_)), a)
        for i, (label, B, S, H, Dz, Dc, layout, act) in enumerate(CONTEXT):
            if forced or (capped and label not in CAPPED):
                continue
            for j, dtype in enumerate(dtypes):
                activation = act or ACTIVATIONS[(i + j) % len(ACTIVATIONS)]
                out_activation = ACTIVATIONS[(i + 2 * j + 1) % len(ACTIVATIONS)]
                bias = (i + j) % 2 == 0
                args = context_args(B, S, H, Dz, Dc, layout, bias, dtype, device)
                paths = context_paths(args[0], out_activation, sm_count) | ({"grid:capped"} if capped else set())
                name = (f"context_linear {label}: B={B} S={S} H={H} Dz={Dz} Dc={Dc} {layout} {activation} "
                        f"out {out_activation} bias={bias} {str(dtype)[6:]}{suffix}")
                yield name, paths, env, lambda a=args, act_=activation, out_=out_activation: \
                    assert_matches_reference(context_call("cuda", act_, out_), on_cpu(context_call("torch", act_, out_)), a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-only", action="store_true", help="check path coverage only; no GPU needed")
    parser.add_argument("--sm-count", type=int, default=None, help="SMs for --plan-only (default: 132, an H100)")
    parser.add_argument("--only", default=None, metavar="TEXT", help="run only the calls whose line contains TEXT")
    parser.add_argument("--verbose", action="store_true", help="print each call's line before it runs")
    args = parser.parse_args(argv)
    if not args.plan_only and not torch.cuda.is_available():
        print("SKIPPED: cuda_kernel_calls: no CUDA device")
        return 0
    import pf_kernels._extension
    pf_kernels._extension.load()
    if args.plan_only:
        device, sm_count = torch.device("cpu"), args.sm_count or 132
    else:
        try:
            import pf_kernels._backend_cuda  # noqa: F401  (its kernels are registered)
        except ImportError as exc:
            print(f"FAILED: cuda_kernel_calls: the cuda backend is unavailable: {exc}")
            return 1
        device = torch.device("cuda")
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    torch.manual_seed(0)
    covered, failures, count = set(), [], 0
    pending = calls(device, sm_count)
    while True:
        try:  # the next call's inputs are made here: a fault left by the previous call surfaces here
            name, paths, env, check = next(pending)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001
            failures.append("inputs")
            print(f"FAIL making the inputs of the call after call {count}: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            break
        if args.only is not None and args.only not in name:
            continue
        count += 1
        covered |= paths
        if args.plan_only:
            continue
        if args.verbose:
            print(f"RUN {name}", flush=True)
        os.environ.update(env)
        try:
            check()
            torch.cuda.synchronize()
            print(f"PASS {name} [{', '.join(sorted(paths))}]", flush=True)
        except Exception as exc:  # noqa: BLE001  (report every call, then fail)
            failures.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        finally:
            for key in env:
                os.environ.pop(key, None)
    missing = sorted(REQUIRED_PATHS - covered) if args.only is None else []
    if missing:
        print(f"FAIL coverage: no call takes {', '.join(missing)} (sm_count {sm_count})")
    what = "planned" if args.plan_only else f"{count - len(failures)} passed, {len(failures)} failed"
    print(f"cuda_kernel_calls: {count} calls {what}; {len(covered & REQUIRED_PATHS)}/{len(REQUIRED_PATHS)} "
          f"code paths covered (sm_count {sm_count})")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
