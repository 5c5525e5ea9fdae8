"""Every Triton kernel, for every autotune config, compiles ahead of time for sm_80 and sm_90 with
no GPU; the result has no register spills, shared memory within the arch's limit, and tensor-core
instructions where the kernel does matrix work. The head kernels compile for MAX_K inputs and
refine_step for MAX_MODALITIES modalities with Dz = MAX_DZ (the one-launch limits, where registers
run out first), with gelu (the most code). Run on each stack: the triton version here decides.

What each tensor-core assertion covers:
- bf16 (every config): sm_80 PTX holds mma.sync; sm_90 holds wgmma where the dot's M tile is >= 64
  with >= 4 warps (Hopper's warpgroup MMA needs that), else mma.sync (refine_step's 16/32-row tiles).
- fp32 default (input_precision="ieee", every config): no mma/wgmma at all (exact FMA dots).
- fp32 with tf32 allowed (PF_KERNELS_TRITON_TF32=1; the matrix kernels): as bf16.
The backproj_concat kernels (a GEMV per batch row, a reduction) do no matrix work: only compile,
spills and shared memory are checked there.

The compiles run in subprocesses (python -m pf_kernels.triton.aot) without TRITON_INTERPRET: the
interpreter, switched on for this session by conftest, makes the kernels uncompilable in-process.
"""
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if not PTXAS.exists():
    pytest.skip(f"no ptxas shipped with triton at {PTXAS}", allow_module_level=True)

aot = importlib.import_module("pf_kernels.triton.aot")
ARCHS = (80, 90)
MATRIX = [spec[0] for spec in aot._kernel_specs("bfloat16") if spec[5]]
# (dtype, tf32, kernels or None for all)
# fp16: the kernels whose dot_split scales a tile into fp16's range (its own code path)
SPLIT = ["mm_grad", "fusion_grad_h", "fusion_grad_w"]
VARIANTS = [("bfloat16", False, None), ("float32", False, None), ("float32", True, MATRIX), ("float16", False, SPLIT)]
TTIR_DTYPES = ("bfloat16", "float32")
RECORDS_ENV = "PF_KERNELS_AOT_RECORDS"  # a file to write every record to (JSON lines)


def _cases():
    for dtype, tf32, only in VARIANTS:
        for name, tuned, *_ in aot._kernel_specs(dtype, tf32):
            if only is None or name in only:
                for arch in ARCHS:
                    for index in range(len(tuned.configs)):
                        tag = f"sm{arch}-{'tf32' if tf32 else dtype}-{name}-c{index}"
                        yield pytest.param(arch, dtype, tf32, name, index, id=tag)


def _run(job, cache_dir):
    arch, dtype, tf32, only = job
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir / f"sm{arch}-{dtype}-{tf32}")
    cmd = [sys.executable, "-m", "pf_kernels.triton.aot", "--arch", str(arch), "--dtype", dtype]
    if tf32 == "ttir":
        cmd.append("--ttir")
    elif tf32:
        cmd.append("--tf32")
    if only:
        cmd += ["--only", *only]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton-cache")
    jobs = [(arch, dtype, tf32, only) for dtype, tf32, only in VARIANTS for arch in ARCHS]
    jobs += [(90, dtype, "ttir", None) for dtype in TTIR_DTYPES]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two compiler processes
        results = list(pool.map(lambda job: _run(job, cache), jobs))
    if os.environ.get(RECORDS_ENV):  # registers, spills, shared memory of every compile, kept
        Path(os.environ[RECORDS_ENV]).write_text("".join(json.dumps(r) + "\n" for b in results for r in b))
    return {(r["arch"], r["dtype"], r.get("tf32", "ttir"), r["kernel"], r.get("config", r.get("variant"))): r
            for batch in results for r in batch}


@pytest.mark.parametrize("arch,dtype,tf32,kernel,config", list(_cases()))
def test_compiles_without_spills_with_tensor_cores(records, arch, dtype, tf32, kernel, config):
    r = records[(arch, dtype, tf32, kernel, config)]
    where = f"{kernel} config {config} {r['meta']} on sm_{arch} ({dtype}{', tf32' if tf32 else ''})"
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"{where}: {r['regs']} registers, spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded"
    assert 0 < r["regs"] <= 255, where
    assert r["shared"] <= r["shared_limit"], f"{where}: {r['shared']} B shared > {r['shared_limit']} B"
    if not r["matrix"]:
        return
    if dtype == "float32" and not tf32:
        assert not r["mma"] and not r["wgmma"], f"{where}: exact fp32 dots must not use tensor cores"
    elif arch == 90 and r["dot_m"] >= 64 and r["meta"].get("num_warps", 4) >= 4:
        assert r["wgmma"], f"{where}: no wgmma in the PTX"
    else:
        assert r["mma"], f"{where}: no mma.sync in the PTX"


@pytest.mark.parametrize("dtype", TTIR_DTYPES)
def test_front_end_takes_every_flag_and_sizes_of_one(records, dtype):
    # The interpreter runs the kernels as Python and the compile above covers one set of flags:
    # a kernel whose code breaks only for some flags (or when Triton turns a size of 1 into a
    # constant) would first fail on a GPU. The front end alone, on every flag value.
    ttir = [r for key, r in records.items() if key[2] == "ttir" and key[1] == dtype]
    assert len(ttir) > len(aot._kernel_specs(dtype)), "the sweep ran no variants"
    failed = [f"{r['kernel']} {r['variant']}: {r['error']}" for r in ttir if r["error"]]
    assert not failed, "\n".join(failed)
