#!/usr/bin/env bash
# The owed GPU work (benchmarks/results_notes.md, "Owed on a GPU") as the calls of short leases: 15 minutes of
# device time a lease, the machine's start (a minute or more) and the transfers included, 10 minutes a command.
# Calls 1 and 2 are one lease, calls 3 and 4 the next, calls 5 and 6 the one after, call 7 a fourth (the timeouts of a lease's calls and a
# two-minute start fit in 15 minutes, and every GPU test file of gpu_suite.sh runs in some call:
# tests/test_gpu_suite.py checks both). Run from the repository root on the GPU machine:
#
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 1   # the GPU tests of every kernel and launch path changed
#                                                              # offline since the last lease (item 0), the sampler's
#                                                              # rows (item 3), which rows cost top-p its time, stage
#                                                              # 1's warps and candidates (item 4), the beam-group
#                                                              # kernels' plans (item 6), the eager calls' host time
#                                                              # (item 5); carry nothing
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 2   # the demo models' speculative rows (item 2, issue
#                                                              # 14); carry .whl/ivg-demo
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 3   # the published code in the modes not yet compared
#                                                              # (item 1), then FlashInfer beside the sampler and
#                                                              # bench_kv --record (item 2); carry .published, .whl
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 4   # the rest of item 0: the kernels' and models' random
#                                                              # configurations, the CUDA block copy (built here)
#                                                              # and the sampler's reference and errors on CUDA
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 5   # one prompt's decoding profiled in every mode but eft
#                                                              # (item 7: the time outside the forwards, per mode)
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 6   # IVG with a 2,048-token prompt, per-beam against
#                                                              # shared-prefix attention, end to end (item 2, issue
#                                                              # 13's 2x)
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 7   # 16 prompts decoded together against each alone,
#                                                              # bf16 and float32 (item 8: whether a prompt's tokens
#                                                              # depend on its batch on a GPU); a fourth lease, or one
#                                                              # with 6 minutes left
#
# Each call's line "timeout_s=N" (printed first) is the device tool's timeout for it. The parts' own limits add up
# to under the call's TARGETS_BUDGET, and a part cut by what is left of the budget records nothing. The sampler's
# rows are recorded only where its tokens are the reference's (bench_sampling checks them in the same run).
# LEASE_DRY_RUN=1 prints each call's timeout, environment and command instead of running it.
set -uo pipefail
cd "$(dirname "$0")/.."

# Every part of `gpu_suite.sh targets` (its header lists them): each call skips the ones it does not run.
PARTS="smoke sampler diagnose tune kv beamgroup profile published spec-demo speculative long invariance decode"

skip_all_but() {  # skip_all_but PART...: the TARGETS_SKIP that leaves only these parts
    local out="" p
    for p in $PARTS; do
        case " $* " in *" $p "*) ;; *) out="$out $p" ;; esac
    done
    echo "${out# }"
}

run() {  # run VAR=VALUE... -- COMMAND...
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    if [ -n "${LEASE_DRY_RUN:-}" ]; then
        printf '%s\n' "${envs[@]}" "$*"
        return 0
    fi
    env "${envs[@]}" "$@"
}

timeout_s() {  # the device tool's timeout for this call (printed, so the one who runs it reads it here)
    echo "timeout_s=$1"
}

case "${1:-}" in
    1)
        timeout_s 560
        run TARGETS_BUDGET=525 TARGETS_SKIP="$(skip_all_but smoke sampler diagnose tune beamgroup profile)" \
            SMOKE_TIMEOUT=150 T_SAMPLING_TIMEOUT=145 T_DIAG_TIMEOUT=40 T_TUNE_TIMEOUT=80 T_BEAM_TIMEOUT=50 \
            T_PROFILE_TIMEOUT=60 \
            T_KERNEL_TESTS="tests/test_sampling_exactness.py tests/test_eager_sample.py tests/test_eager_draft.py
tests/test_eager_attention.py tests/test_speculative_kernels.py tests/test_shared_prefix_attention.py
tests/test_sampling_parity.py tests/test_planned_steps.py tests/test_speculative.py tests/test_attention_kernels.py
tests/test_paged_models.py tests/test_model_families.py" \
            -- bash benchmarks/gpu_suite.sh targets
        ;;
    2)
        timeout_s 170
        run TARGETS_BUDGET=150 TARGETS_SKIP="$(skip_all_but spec-demo)" T_SPEC_DEMO_TIMEOUT=140 \
            -- bash benchmarks/gpu_suite.sh targets
        ;;
    3)
        timeout_s 560
        run TARGETS_BUDGET=300 TARGETS_SKIP="$(skip_all_but published)" PUBLISHED_MODES="tokenrm cbs bon plain" \
            T_PUBLISHED_TIMEOUT=285 -- bash benchmarks/gpu_suite.sh targets
        first=$?
        run FI_SAMPLING_TIMEOUT=120 FI_KV_TIMEOUT=90 -- bash benchmarks/gpu_suite.sh flashinfer || exit $?
        exit "$first"
        ;;
    4)
        timeout_s 200
        run GPU_TESTS="tests/test_kernel_random_configs.py tests/test_model_random_configs.py tests/test_row_rope.py
tests/test_cuda_kernels.py tests/test_cuda_build_dispatch.py tests/test_philox.py tests/test_sampling_errors.py
tests/test_sampling_reference.py" TESTS_TIMEOUT=170 -- bash benchmarks/gpu_suite.sh tests
        ;;
    5)
        timeout_s 600
        run TARGETS_BUDGET=560 TARGETS_SKIP="$(skip_all_but decode)" PROFILE_MODES="ivg cbs-explicit bon tokenrm base" \
            T_DECODE_PROFILE_TIMEOUT=110 -- bash benchmarks/gpu_suite.sh targets
        ;;
    6)
        timeout_s 170
        run TARGETS_BUDGET=150 TARGETS_SKIP="$(skip_all_but long)" T_LONG_TIMEOUT=145 \
            -- bash benchmarks/gpu_suite.sh targets
        ;;
    7)
        timeout_s 340
        run TARGETS_BUDGET=315 TARGETS_SKIP="$(skip_all_but invariance)" T_INVARIANCE_TIMEOUT=150 \
            -- bash benchmarks/gpu_suite.sh targets
        ;;
    *)
        echo "usage: $0 1|2|3|4|5|6|7 (calls 1-2: one lease; 3-4: the next; 5-6: the one after; 7: a fourth)" >&2
        exit 2
        ;;
esac
