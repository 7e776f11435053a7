#!/usr/bin/env bash
# One-command GPU validation for a bare CUDA machine with no network (PyTorch, Triton and transformers
# preinstalled; nothing is installed). Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh [tests|sanitize|bench|all]     (default: all)
#
# Stages:
#   tests     every test file on the GPU (parity of each backend with the reference, CUDA-graph replay,
#             torch.compile, the decoder on CUDA against the naive baseline), skipping none but the demo
#   sanitize  compute-sanitizer memcheck and racecheck over the CUDA kernels (when csrc/ builds)
#   bench     bench_sampling, bench_kv and bench_decode with --record: appends to benchmarks/results.csv
#             and re-renders benchmarks/RESULTS.md and benchmarks/results.png
#
# Logs and a copy of results.csv/RESULTS.md go to $OUT (default: ./gpu_suite_out). The tree may travel
# without .git: set IVG_BENCH_COMMIT to the commit the rows should name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STAGE="${1:-all}"
STATUS=0

note() { echo "== gpu_suite: $* ($(date -u +%H:%M:%S))"; }

env_report() {
    note "environment"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__); print(torch.cuda.get_device_name(0))'
    command -v nvcc >/dev/null && nvcc --version | tail -1
}

run_tests() {
    note "tests"
    "$PY" -m pytest -q -n 4 -p no:cacheprovider --timeout 300 -rfEs tests benchmarks/test_bench_sampling.py \
        2>&1 | tee "$OUT/tests.log" | tail -60
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || STATUS=1
}

run_sanitize() {
    note "compute-sanitizer"
    if [ -f tests/sanitize_cuda.py ] && command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" tests/sanitize_cuda.py \
                > "$OUT/sanitize_$tool.log" 2>&1
            local rc=$?
            tail -3 "$OUT/sanitize_$tool.log"
            echo "compute-sanitizer $tool exit $rc"
            [ "$rc" -eq 0 ] || STATUS=1
        done
    else
        echo "no CUDA kernels to sanitize (tests/sanitize_cuda.py or compute-sanitizer missing)"
    fi
}

run_bench() {
    note "bench_sampling"
    "$PY" benchmarks/bench_sampling.py --record 2>&1 | tee "$OUT/bench_sampling.log" | tail -40 || STATUS=1
    note "bench_kv"
    "$PY" benchmarks/bench_kv.py --record 2>&1 | tee "$OUT/bench_kv.log" | tail -30 || STATUS=1
    note "bench_decode"
    "$PY" benchmarks/bench_decode.py --record 2>&1 | tee "$OUT/bench_decode.log" | tail -20 || STATUS=1
    cp benchmarks/results.csv benchmarks/RESULTS.md "$OUT"/ 2>/dev/null
    [ -f benchmarks/results.png ] && cp benchmarks/results.png "$OUT"/
}

env_report 2>&1 | tee "$OUT/env.log"
case "$STAGE" in
    tests) run_tests ;;
    sanitize) run_sanitize ;;
    bench) run_bench ;;
    all) run_tests; run_sanitize; run_bench ;;
    *) echo "usage: $0 [tests|sanitize|bench|all]" >&2; exit 2 ;;
esac
note "done, status $STATUS"
exit $STATUS
