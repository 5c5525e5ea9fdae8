"""Ahead-of-time compilation of every Triton kernel of this backend, for each autotune config, for
a given CUDA arch, with no GPU: `python -m pf_kernels.triton.aot --arch 80 --dtype bfloat16`
prints one JSON record per (kernel, config): registers, spills, shared memory, and which
tensor-core instructions the PTX holds. `--ttir` instead runs Triton's front end alone (cheap) on
every value of every flag of every kernel (one flag changed at a time) and on sizes equal to 1
(which Triton specialises to constants): a kernel whose code only breaks for some flags fails
there, not on the first GPU. tests/test_triton_aot.py runs both and checks the records.

Must run without TRITON_INTERPRET (the kernels must be JIT functions to compile).
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in maximum per block


def _kernel_specs(dtype: str, tf32: bool = False):
    """(name, Tuned, fp32 pointer args, unit-stride args, fixed constexprs, does matrix work, the M
    extent of its dot for a config) for every kernel launch variant of this dtype.

    Compiled as the JIT specialises for contiguous inputs: innermost strides equal to 1 become
    constexprs, pointers are 16-byte aligned. The activation is gelu (the most code); the head
    kernels take MAX_K inputs and refine_step MAX_MODALITIES modalities with Dz = MAX_DZ: the
    one-launch limits, where registers run out first.
    """
    bp = importlib.import_module("pf_kernels.triton.backproj_concat")
    fh = importlib.import_module("pf_kernels.triton.fusion_head")
    rs = importlib.import_module("pf_kernels.triton.refine_step")
    rsh = importlib.import_module("pf_kernels.triton.refine_step_hoisted")
    cl = importlib.import_module("pf_kernels.triton.context_linear")
    mmm = importlib.import_module("pf_kernels.triton._matmul")
    prec = "ieee" if dtype == "float32" and not tf32 else "tf32"
    fp32 = dtype == "float32"  # the fp32 launchers use their own configs where they differ

    def by_dtype(tuned16, tuned32):
        return tuned32 if fp32 else tuned16

    K, NMOD = fh.MAX_K, rs.MAX_MODALITIES
    hk = {f"sk{j}" for j in range(K)}
    mm = by_dtype(mmm.mm_tuned, mmm.mm_tuned_fp32)
    bm = lambda c: c["BM"]  # noqa: E731
    return [
        ("backproj_fill", bp.backproj_fill, set(), {"sxd"}, dict(ROWS64=False), False, None),
        ("backproj_reduce", bp.backproj_reduce, {"pre_ptr", "out_ptr"}, {"sgd"},
         dict(ACT=2, FINISH=True), False, None),
        # the weight-side gradients: an fp32 gradient times an input (grad_z = grad_pre @ W)
        ("mm_grad", mm, {"a_ptr"}, {"sak", "sbn", "scn", "sbias"},
         dict(HAS_BIAS=False, ACT=0, PREC=prec), True, bm),
        # the back-projection's context: act(z @ W.T + b)
        ("mm_context", mm, set(), {"sak", "sbk", "scn", "sbias"},
         dict(HAS_BIAS=True, ACT=2, PREC=prec), True, bm),
        # context_linear's (B, H) term: fp32 out of two inputs in the dtype (c @ W_c.T)
        ("mm_term", mm, {"c_ptr"}, {"sak", "sbk", "scn", "sbias"},
         dict(HAS_BIAS=False, ACT=0, PREC=prec), True, bm),
        # context_linear's forward: the context, the term (two dots) and the pass over p
        ("context_linear", by_dtype(cl.context_forward, cl.context_forward_fp32), set(),
         {"sph", "szk", "sbwk", "sbb", "spwc"}, dict(HAS_BIAS=True, ACT=2, OUT_ACT=2, PREC=prec), True, bm),
        ("context_reduce", cl.context_reduce, {"term_ptr", "sum_ptr"}, {"sgh", "ssh"}, dict(OUT_ACT=2),
         False, None),
        ("fusion_fwd", by_dtype(fh.fusion_fwd, fh.fusion_fwd_fp32), {"pre_ptr"}, hk | {"swk", "sb", "son"},
         dict(K=K, H_UNIT=True, HAS_BIAS=True, ACT=2, SAVE_PRE=True, PREC=prec), True, bm),
        ("fusion_grad_h", by_dtype(fh.fusion_grad_h, fh.fusion_grad_h_fp32), {"pre_ptr"}, {"sgn", "swk"},
         dict(K=K, ACT=2, PREC=prec), True, bm),
        ("fusion_grad_w", by_dtype(fh.fusion_grad_w, fh.fusion_grad_w_fp32), {"pre_ptr"}, hk | {"sgn"},
         dict(K=K, H_UNIT=True, HAS_BIAS=True, ACT=2, PREC=prec), True, lambda c: c["BN"]),
        ("refine_step", by_dtype(rs.refine_step_tuned, rs.refine_step_tuned_fp32), {"pre_ptr"},
         hk | {"shk", "shb"} | {f"{n}{j}" for n in ("sxd", "swk", "sb") for j in range(NMOD)},
         dict(K=K, H_UNIT=True, NMOD=NMOD, HAS_HEAD_BIAS=True, BIAS_MASK=0b0101, HEAD_ACT=2, ACT=2, SAVE_PRE=True,
              PREC=prec, BZ=rs.MAX_DZ), True, bm),
        ("refine_step_hoisted", by_dtype(rsh.hoisted_tuned, rsh.hoisted_tuned_fp32), {"pre_ptr"},
         hk | {"shk", "shb"} | {f"{n}{j}" for n in ("sph", "swk", "sb", "svc") for j in range(NMOD)},
         dict(K=K, H_UNIT=True, NMOD=NMOD, HAS_HEAD_BIAS=True, BIAS_MASK=0b0101, HEAD_ACT=2, ACT=2,
              OUT_ACTS=sum(2 << (3 * j) for j in range(NMOD)), SAVE_PRE=True, PREC=prec, BZ=rs.MAX_DZ), True, bm),
    ]


def _parse_ptxas_log(log: str):
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spill_st = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    spill_ld = [int(m) for m in re.findall(r"(\d+) bytes spill loads", log)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return max(regs), max(spill_st + [0]), max(spill_ld + [0])


def _is_pointer(name: str) -> bool:
    """The kernels' pointer arguments: *_ptr, and the slots of per-input pointers (h0, x0, o0, ...)."""
    return name.endswith("_ptr") or re.fullmatch(r"[hxowbgpv][0-7]", name) is not None


def _source(kernel, dtype: str, fp32_ptrs, unit, constexprs):
    """An ASTSource of kernel: pointers 16-byte aligned in dtype (or fp32), `unit` arguments the
    constant 1, the other integers i32."""
    from triton.compiler import ASTSource

    ty = DTYPE_NAMES[dtype]
    constexprs = {**constexprs, **{n: 1 for n in unit}}
    signature, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr or p.name in unit:
            signature[p.name] = "constexpr"
        elif _is_pointer(p.name):
            signature[p.name] = "*fp32" if p.name in fp32_ptrs else f"*{ty}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "i32"
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_all(arch: int, dtype: str, only=None, tf32: bool = False):
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run to report registers and spills
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    records = []
    for name, tuned, fp32_ptrs, unit, fixed, matrix, dot_m in _kernel_specs(dtype, tf32):
        if only and name not in only:
            continue
        for index, cfg in enumerate(tuned.options):
            meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            src = _source(tuned.kernel, dtype, fp32_ptrs, unit, {**fixed, **meta})
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=target, options=dict(
                    num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2)))
            regs, spill_stores, spill_loads = _parse_ptxas_log(log.getvalue())
            ptx = compiled.asm["ptx"]
            records.append(dict(
                kernel=name, arch=arch, dtype=dtype, tf32=tf32, config=index, meta=cfg, matrix=matrix,
                dot_m=dot_m(cfg) if dot_m else None, regs=regs, spill_stores=spill_stores,
                spill_loads=spill_loads, shared=compiled.metadata.shared,
                shared_limit=SHARED_LIMIT[arch],
                mma=bool(re.search(r"\bmma\.sync", ptx)), wgmma=bool(re.search(r"\bwgmma\.", ptx))))
    return records


# The values each flag (constexpr) of a kernel takes in some launch.
FLAG_VALUES = dict(ACT=range(5), HEAD_ACT=range(5), HAS_BIAS=(True, False), HAS_HEAD_BIAS=(True, False),
                   SAVE_PRE=(True, False), H_UNIT=(True, False), FINISH=(True, False),
                   ROWS64=(True, False), OUT_ACT=range(5), K=(1, 2, 8), NMOD=(1, 2, 4), BIAS_MASK=(0, 1, 15),
                   OUT_ACTS=(0, 1, 2 | 4 << 3 | 3 << 6 | 1 << 9),  # 3 bits per modality
                   PREC=("ieee", "tf32"))


def ttir_all(arch: int, dtype: str):
    """Triton's front end (source to TTIR) on every flag value of every kernel, one flag changed at
    a time from the compile spec, and on every size argument equal to 1; config 0 (the configs
    compile in full in compile_all). Records with the error where one fails."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    records = []
    for name, tuned, fp32_ptrs, unit, fixed, _matrix, _dot_m in _kernel_specs(dtype):
        cfg = tuned.options[0]
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        variants = [("spec", fixed, unit)]
        for flag, value in fixed.items():
            variants += [(f"{flag}={v}", {**fixed, flag: v}, unit)
                         for v in FLAG_VALUES.get(flag, ()) if v != value]
        sizes = {p.name for p in tuned.kernel.params if not p.is_constexpr and not _is_pointer(p.name)}
        variants.append(("sizes=1", fixed, sizes))
        options = backend.parse_options(dict(num_warps=cfg.get("num_warps", 4)))
        for variant, flags, ones in variants:
            error = None
            try:
                context = ir.context()
                ir.load_dialects(context)
                backend.load_dialects(context)
                _source(tuned.kernel, dtype, fp32_ptrs, ones, {**flags, **meta}).make_ir(
                    target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                    context)
            except Exception as exc:  # reported, with the variant, by the test
                error = f"{type(exc).__name__}: {exc}"[-2000:]
            records.append(dict(kernel=name, arch=arch, dtype=dtype, variant=variant, error=error))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=80)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--only", nargs="*", help="kernel names")
    parser.add_argument("--tf32", action="store_true", help="fp32 dots in tf32 (as with %s=1)" % "PF_KERNELS_TRITON_TF32")
    parser.add_argument("--ttir", action="store_true", help="the front end alone, on every flag value")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if args.ttir:
        records = ttir_all(args.arch, args.dtype)
    else:
        records = compile_all(args.arch, args.dtype, args.only, args.tf32)
    for record in records:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
