#!/usr/bin/env bash
# The owed GPU work (benchmarks/results_notes.md, "Owed on a GPU") as the calls of one short lease: 15 minutes of
# device time with the machine's start, 10 minutes a command. Run from the repository root on the GPU machine:
#
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 1     # timeout 600: the sampler's rows (item 3), stage 1's
#                                                                # warps (item 4), the published code in the modes
#                                                                # not yet compared (item 1)
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 2     # timeout 240: the GPU tests of every kernel and
#                                                                # launch path changed offline since the last lease
#                                                                # (item 0), then the demo models' speculative rows
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 3     # optional, about 8 minutes: the beam-group kernels'
#                                                                # plans (item 6), the eager calls' host time (item 5),
#                                                                # the rest of item 0, FlashInfer beside the sampler
#                                                                # and bench_kv --record (item 2)
#     IVG_BENCH_COMMIT=<sha> bash benchmarks/lease_plan.sh 4     # timeout 600: one prompt's decoding profiled in
#                                                                # every mode but eft (item 7: the time outside the
#                                                                # forwards, per mode)
#
# Carry `.published` and `.whl` (benchmarks/fetch_published_wheels.sh, fetch_flashinfer.sh, pack_demo_models.sh).
# Call 1 records the sampler's rows only where its tokens are the reference's (bench_sampling checks them), since
# its GPU tests run in call 2. LEASE_DRY_RUN=1 prints each call's environment and command instead of running it.
set -uo pipefail
cd "$(dirname "$0")/.."

# Every part of `gpu_suite.sh targets` (its header lists them): each call skips the ones it does not run.
PARTS="smoke sampler diagnose tune kv beamgroup profile published spec-demo speculative decode"

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

case "${1:-}" in
    1)
        run TARGETS_BUDGET=560 TARGETS_SKIP="$(skip_all_but sampler diagnose tune published)" \
            T_SAMPLING_TIMEOUT=130 T_TUNE_TIMEOUT=90 PUBLISHED_MODES="tokenrm cbs bon plain" T_PUBLISHED_TIMEOUT=285 \
            -- bash benchmarks/gpu_suite.sh targets
        ;;
    2)
        run TARGETS_BUDGET=230 TARGETS_SKIP="$(skip_all_but smoke spec-demo)" SMOKE_TIMEOUT=150 \
            T_KERNEL_TESTS="tests/test_sampling_exactness.py tests/test_eager_sample.py tests/test_eager_draft.py
tests/test_eager_attention.py tests/test_speculative_kernels.py tests/test_shared_prefix_attention.py
tests/test_sampling_parity.py tests/test_planned_steps.py tests/test_speculative.py" \
            -- bash benchmarks/gpu_suite.sh targets
        ;;
    3)
        run TARGETS_BUDGET=110 TARGETS_SKIP="$(skip_all_but beamgroup profile)" \
            GPU_TESTS="tests/test_kernel_random_configs.py tests/test_model_random_configs.py tests/test_row_rope.py" \
            TESTS_TIMEOUT=150 -- bash benchmarks/gpu_suite.sh targets tests
        first=$?
        run FI_SAMPLING_TIMEOUT=120 FI_KV_TIMEOUT=90 -- bash benchmarks/gpu_suite.sh flashinfer || exit $?
        exit "$first"
        ;;
    4)
        run TARGETS_BUDGET=560 TARGETS_SKIP="$(skip_all_but decode)" PROFILE_MODES="ivg cbs-explicit bon tokenrm base" \
            T_DECODE_PROFILE_TIMEOUT=120 -- bash benchmarks/gpu_suite.sh targets
        ;;
    *)
        echo "usage: $0 1|2|3|4 (the calls of one lease, in order)" >&2
        exit 2
        ;;
esac
