#!/usr/bin/env bash
# Every GPU check of the project in one run:   bench/gpu_check.sh OUTDIR
#
# Each step runs under its own `timeout`, logs to OUTDIR/<step>.log, and a failed step does not
# stop the next one. OUTDIR/summary.json maps step -> exit code, seconds and timeout; the
# script exits 1 if any step failed. The whole run must fit in 8 minutes (480 s): keep the sum
# of the step timeouts below that when adding steps.
set -u

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2  # repo root: tests and `python -m bench.*` import from here

STEPS=()
FAILED=0
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (timeout ${limit}s)"
    local t0 rc ms
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    [ "$rc" -eq 0 ] || FAILED=1
    printf '   exit %d after %d.%03d s\n' "$rc" $((ms / 1000)) $((ms % 1000))
    STEPS+=("$(printf '"%s": {"exit_code": %d, "seconds": %d.%03d, "timeout_s": %d}' \
        "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit")")
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null || echo "commit unknown"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1

# --- issue 4: fused LoRA kernels (kernels/lora.py) --------------------------------------------
# Compiled, not interpreted: TRITON_INTERPRET=0 makes the tests parametrize on cuda. Most of the
# time is Triton compiling one kernel variant per dtype / mask / rank-block / alignment.
step kernel_tests 150 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider \
    tests/test_kernels_lora.py --junitxml="$OUT/kernel_tests.xml"
# Full grid, 648 timings: about two minutes estimated (unmeasured until the first GPU run).
step bench_lora 140 env TRITON_INTERPRET=0 python -m bench.bench_lora --out "$OUT"

# --- issue 6: LLaMA-7B LoRA step under a 24 GiB plan, ours vs transformers + peft ------------
step bench_train_7b 180 env TRITON_INTERPRET=0 python bench/bench_train_7b.py \
    "$OUT/bench_train_7b" --budget 24GiB --seq 512 --peak-tflops 790

# --- later issues: add steps here ------------------------------------------------------------
# Timeouts so far: 150 + 140 + 180 = 470 s of the 480 s budget.

{
    echo "{"
    echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"commit\": \"$(git rev-parse HEAD 2>/dev/null || echo unknown)\","
    echo "  \"steps\": {"
    for i in "${!STEPS[@]}"; do
        sep=","
        [ "$i" -eq $((${#STEPS[@]} - 1)) ] && sep=""
        echo "    ${STEPS[$i]}$sep"
    done
    echo "  }"
    echo "}"
} >"$OUT/summary.json"
# The device tool returns at most 8 files: bundle everything, keep summary.json beside it.
BUNDLE=$(mktemp -d)/gpu_check.tgz
tar czf "$BUNDLE" -C "$OUT" . && find "$OUT" -mindepth 1 ! -name summary.json -delete \
    && mv "$BUNDLE" "$OUT/"
echo "summary: $OUT/summary.json (all logs and results in $OUT/gpu_check.tgz)"
exit "$FAILED"
