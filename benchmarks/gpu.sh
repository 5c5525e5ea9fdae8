#!/usr/bin/env bash
# The GPU benchmark work of issue 12 as single commands for a lent GPU machine (10 minutes a command,
# at most 8 files back). Run from the repository root with the python it is given; results in $OUT.
#   benchmarks/gpu.sh quick     about 2 min: python -m benchmarks --device cuda --quick (make gpu-check's part)
#   benchmarks/gpu.sh full      about 8 min: the whole grid and every end-to-end variant (compile: some rows)
#   benchmarks/gpu.sh profile   about 1-2 min: the end-to-end steps, then per op and provider: the kernels
#                               (and host ops) and what bounds each row
#   benchmarks/gpu.sh ncu       about 2 min: Nsight Compute over our kernels in the quick grid's calls and a
#                               pf-r3 training step: duration, throughput, occupancy per kernel (benchmarks/ncu.py)
#   benchmarks/gpu.sh paths     about 1 min: the B=4096 rows with the launch plans' choice, then forced to
#                               our kernels and to cuBLAS (PF_KERNELS_CUDA_PATH), and the comparison
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
    timeout $(($1 + 60)) "$PY" -m benchmarks.profile --device cuda --time-limit "$1" --e2e pf-r3 pf-r3-wide \
        --out "$OUT/profile" \
        2>&1 | tee "$OUT/profile/log.txt"
}
case "$MODE" in
    quick) bench 110 --quick ;;
    full) bench 420 --compile some ;;
    profile) profile 90 ;;
    ncu) timeout 240 "$PY" -m benchmarks.ncu --out "$OUT/profile" --timeout 180 2>&1 | tee "$OUT/profile/ncu_log.txt" ;;
    paths)  # is the plan's inline-vs-GEMM crossover right on this GPU? (issue 12: backproj_concat at 64 MB)
        # Printed, not saved under $OUT: a device call brings back at most 8 files.
        runs=$(mktemp -d)
        for path in plan kernel cublas; do
            # (the triton column is not the question here: its first config, no autotuning sweep)
            PF_KERNELS_TRITON_AUTOTUNE=0 PF_KERNELS_CUDA_PATH=$([ "$path" = plan ] || echo "$path") \
                timeout 150 "$PY" -m benchmarks --device cuda \
                --quick --cases B=4096 --ops backproj_concat fusion_head --compile none --no-e2e --time-limit 90 \
                --out "$runs/$path" > "$runs/$path.log" 2>&1
            echo "== $path: $(grep -c ' fwd' "$runs/$path.log") rows"
            grep -E "^(op |backproj_concat|fusion_head) " "$runs/$path.log"
        done
        for path in kernel cublas; do
            echo "== forced $path against the plan's choice"
            "$PY" -m benchmarks.report compare "$runs/$path/bench.json" "$runs/plan/bench.json"
        done
        rm -rf "$runs" ;;
    *) echo "usage: benchmarks/gpu.sh quick|full|profile|ncu|paths"; exit 2 ;;
esac
