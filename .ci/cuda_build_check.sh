#!/usr/bin/env bash
# CI, no GPU needed: the CUDA kernels of pf_kernels._C compile and link against a CUDA build of
# torch, ptxas reports no register spills and no stack frame (local memory, or a call such as a
# 64-bit division) for any kernel on any arch, every kernel is built for every arch, static shared
# memory stays within 48 KiB, and the built library registers a CUDA kernel for every op that has a
# CPU one.
#
# Builds into its own directory (never the in-place .so of the source tree), unless told to. Knobs:
#   PF_KERNELS_CUDA_VENV       venv with the CUDA build of torch (created if missing),
#                              default build/cuda-check/venv
#   PF_KERNELS_CUDA_BUILD_DIR  build directory, default build/cuda-check
#   PF_KERNELS_CUDA_INPLACE=1  build in place instead, as `make build` does (for CI's throwaway clone,
#                              whose `make test`, given the same environment, then compiles nothing)
#   PF_KERNELS_CUDA_TORCH      torch requirement, default torch==2.14.1
#   CUDA_HOME                  toolkit, default /usr/local/cuda
#   TORCH_CUDA_ARCH_LIST       default "8.0;9.0";  MAX_JOBS default 2
# Exit 0: passed, or SKIPPED (no nvcc, or the torch wheel cannot be installed); 1: failed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
start=$(date +%s)

BUILD_DIR=${PF_KERNELS_CUDA_BUILD_DIR:-$ROOT/build/cuda-check}
VENV=${PF_KERNELS_CUDA_VENV:-$BUILD_DIR/venv}
TORCH_REQ=${PF_KERNELS_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}

skip() {
  echo "################################################################" >&2
  echo "SKIPPED: CUDA build check: $*" >&2
  echo "################################################################" >&2
  exit 0
}

[ -x "$CUDA_HOME/bin/nvcc" ] || skip "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
mkdir -p "$BUILD_DIR"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, ninja" 2>/dev/null; then
  echo "cuda_build_check: creating $VENV with $TORCH_REQ" >&2
  python3 -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install -q "$TORCH_REQ" ninja setuptools wheel numpy >"$BUILD_DIR/pip.log" 2>&1; then
    tail -5 "$BUILD_DIR/pip.log" >&2
    skip "could not install $TORCH_REQ into $VENV (log: $BUILD_DIR/pip.log)"
  fi
fi
PY="$VENV/bin/python"
torch_cuda=$("$PY" -c "import torch; print(torch.version.cuda or '')")
[ -n "$torch_cuda" ] || skip "torch in $VENV is not a CUDA build ($("$PY" -c 'import torch; print(torch.__version__)'))"
echo "cuda_build_check: torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $torch_cuda)," \
     "$("$CUDA_HOME/bin/nvcc" --version | tail -1), archs $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS" >&2

if [ "${PF_KERNELS_CUDA_INPLACE:-0}" = 1 ]; then
  TEMP=$ROOT/build LIB=$ROOT/pf_kernels BUILD_ARGS=(--inplace)
else
  TEMP=$BUILD_DIR/temp LIB=$BUILD_DIR/lib BUILD_ARGS=(--build-temp "$TEMP" --build-lib "$LIB")
fi
# ptxas prints only for what it compiles: drop the CUDA objects so they rebuild (the C++ ones stay cached).
find "$TEMP" -path '*/csrc/cuda/*.o' -delete 2>/dev/null || true
LOG="$BUILD_DIR/build.log"
if ! PF_KERNELS_FORCE_CUDA=1 PF_KERNELS_PTXAS_VERBOSE=1 "$PY" setup.py build_ext "${BUILD_ARGS[@]}" >"$LOG" 2>&1; then
  grep -E "error|Error" "$LOG" | head -40 >&2 || true
  echo "FAILED: CUDA build check: the build failed (log: $LOG)" >&2
  exit 1
fi

SO=$(find "$LIB" -name '_C*.so' | head -1)
[ -n "$SO" ] || { echo "FAILED: CUDA build check: no _C*.so under $LIB" >&2; exit 1; }
"$PY" - "$LOG" "$SO" <<'EOF'
import importlib.util
import re
import subprocess
import sys

log_path, so_path = sys.argv[1], sys.argv[2]
text = open(log_path, errors="replace").read()
warnings = sorted({line.strip() for line in text.splitlines()
                   if re.search(r"warning", line, re.I) and "csrc/" in line})
kernels = {}  # (arch, mangled) -> dict
current = None
for line in text.splitlines():
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
    if m:
        current = (m.group(2), m.group(1))
        kernels[current] = {"regs": None, "spill_st": 0, "spill_ld": 0, "stack": 0, "smem": 0}
        continue
    if current is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        k = kernels[current]
        k["stack"], k["spill_st"], k["spill_ld"] = (int(g) for g in m.groups())
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m:
        k = kernels[current]
        k["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        k["smem"] = int(s.group(1)) if s else 0
        current = None

names = sorted({name for _, name in kernels})
try:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    demangled = dict(zip(names, out.splitlines()))
except (OSError, subprocess.CalledProcessError):
    demangled = {}

def short(name):
    d = demangled.get(name, name)
    d = re.sub(r"^void ", "", d)
    d = d.replace("pf_kernels::cuda::(anonymous namespace)::", "").replace("c10::", "")
    d = d.replace("pf_kernels::", "")
    depth, cut = 0, len(d)
    for i, ch in enumerate(d):  # drop the argument list: first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    return d[:cut]

rows = sorted(kernels.items(), key=lambda kv: (short(kv[0][1]), kv[0][0]))
print(f"{'arch':6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
for (arch, name), k in rows:
    print(f"{arch:6} {k['regs'] if k['regs'] is not None else '?':>4} "
          f"{str(k['spill_st']) + '/' + str(k['spill_ld']):>11} {k['stack']:>5} {k['smem']:>6}  {short(name)}")
    # smem: static shared memory, all there is (no kernel takes dynamic shared memory).

failures = []
if not kernels:
    failures.append("no ptxas output found: were the CUDA sources compiled with -Xptxas=-v?")
archs = {arch for arch, _ in kernels}
per_arch = {a: {n for (ar, n) in kernels if ar == a} for a in archs}
if len({frozenset(short(n) for n in v) for v in per_arch.values()}) > 1:
    failures.append(f"kernels differ per arch: { {a: len(v) for a, v in per_arch.items()} }")
for (arch, name), k in rows:
    if k["spill_st"] or k["spill_ld"]:
        failures.append(f"{arch} {short(name)} spills ({k['spill_st']} B stores, {k['spill_ld']} B loads)")
    if k["stack"]:
        failures.append(f"{arch} {short(name)} has a {k['stack']} B stack frame (local memory or a call)")
    if k["smem"] > 48 * 1024:
        failures.append(f"{arch} {short(name)} uses {k['smem']} B of static shared memory (> 48 KiB)")
    if k["regs"] is None:
        failures.append(f"{arch} {short(name)}: no register count in the ptxas output")
for w in warnings:
    print(f"compiler warning: {w}", file=sys.stderr)

# The built library registers a CUDA (and CPU) kernel for every op; loading it needs no GPU.
import torch  # noqa: E402  (before the library, which links libtorch)
spec = importlib.util.spec_from_file_location("_C", so_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
# Every op with a CPU kernel (test-only helpers, named _*, aside) has a CUDA kernel too.
ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
             if name.startswith("pf_kernels::") and not name.startswith("pf_kernels::_"))
if len(ops) < 6:  # backproj_concat, fusion_head, context_linear and their backward ops
    failures.append(f"{so_path} registers only {ops}")
for op in ops:
    for key in ("CUDA", "CPU"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pf_kernels::{op}", key):
            failures.append(f"{so_path} registers no {key} kernel for pf_kernels::{op}")
if "pf_kernels::_launch_plan" not in torch._C._dispatch_get_all_op_names():
    failures.append(f"{so_path} does not define pf_kernels::_launch_plan (the CPU tests of the launch arithmetic)")
missing = [f for f in failures if "registers no" in f]
print(f"{len(kernels)} kernel compilations on {', '.join(sorted(archs))}; CUDA and CPU kernels of "
      f"{len(ops)} ops ({', '.join(ops)}) registered: {'NO' if missing else 'yes'}")
if failures:
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    sys.exit(1)
EOF
echo "cuda_build_check: passed in $(( $(date +%s) - start )) s (log: $LOG)"
