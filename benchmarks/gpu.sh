#!/usr/bin/env bash
# The GPU benchmark work of issue 12 as single commands for a lent GPU machine (10 minutes a command,
# at most 8 files back). Run from the repository root with the python it is given; results in $OUT.
#   benchmarks/gpu.sh quick     about 2 min: python -m benchmarks --device cuda --quick (make gpu-check's part)
#   benchmarks/gpu.sh full      about 8 min: the whole grid and every end-to-end variant (compile: some rows)
#   benchmarks/gpu.sh profile   about 1-2 min: per op and provider, the kernels and what bounds each row
# Builds pf_kernels._C for this GPU first where its CUDA kernels are missing.
set -uo pipefail
MODE=${1:-quick}
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT/bench" "$OUT/profile"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh $MODE: SKIPPED (torch sees no CUDA device)"; exit 0
fi

if ! "$PY" -c "import pf_kernels, sys; sys.exit(not pf_kernels.available_backends()['cuda']['available'])"; then
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "building pf_kernels._C for sm_${arch/./}"
    MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST="$arch" PF_KERNELS_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace \
        > "$OUT/bench/build.log" 2>&1 || { tail -30 "$OUT/bench/build.log"; exit 1; }
fi
"$PY" -c "import pf_kernels, torch; print(torch.cuda.get_device_name(), {k: v['available'] for k, v in pf_kernels.available_backends().items()})"

bench() {  # the time limit marks unstarted rows skipped; timeout is the backstop for a row that hangs
    local limit=$1; shift
    timeout $((limit + 60)) "$PY" -m benchmarks --device cuda --time-limit "$limit" --out "$OUT/bench" "$@" \
        2>&1 | tee "$OUT/bench/log.txt"
}
profile() {
    timeout $(($1 + 60)) "$PY" -m benchmarks.profile --device cuda --time-limit "$1" --out "$OUT/profile" \
        2>&1 | tee "$OUT/profile/log.txt"
}
case "$MODE" in
    quick) bench 110 --quick ;;
    full) bench 420 --compile some ;;
    profile) profile 90 ;;
    *) echo "usage: benchmarks/gpu.sh quick|full|profile"; exit 2 ;;
esac
