#!/usr/bin/env bash
# One-command GPU validation for a bare CUDA machine with no network (PyTorch, Triton and transformers
# preinstalled; nothing is installed). Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh [targets|build|tests|sanitize|check|bench|speculative|published|flashinfer|all]...   (default: all, about 10 minutes)
#
# Stages:
#   targets   for a session with one short lease (one device command, TARGETS_BUDGET seconds, default 530): the
#             GPU tests of the eager launch paths, the decoder and the kernels against the reference
#             (test_sampling_gpu.py, test_gpu.py, attention, beam groups, speculative, sampler parity, paged
#             models, the model families; the kernels' random configurations run in `check`: the sampler's compiles
#             about 40 variants, over 2 minutes on the H200), then, pass or fail, one measurement per open issue's headline target, each under the
#             lesser of its own limit and what is left of the budget (a part cut by its limit records
#             nothing, but its log keeps the rows it printed): the sampler at N 1 and 256, V 151936
#             (no filter, top-k 50, top-p 0.9 and 0.95, min-p 0.05; eager and graph; FlashInfer beside it when
#             .whl/flashinfer/ came along), which rows cost top-p its time at N=256 (diagnose_top_p.py), stage 1's
#             warps on slices of 4,096, 8 against 4, and the filters' candidates per slice, 16 against 8
#             (tune_stage1.py), bench_kv (eager N=1 against SDPA, bandwidth, the beam-group rows), the beam-group
#             kernels' own times over several plans (diagnose_beam_group.py),
#             the eager calls' host time profiled (profile_eager.py), the published code in modes ivg and
#             eft (when .published/ came along: this decoder on the issue's 64 prompts, the published code,
#             which decodes one prompt at a time, on the first 8), speculative eft and ivg on the demo's trained
#             models (16 prompts; carried in .whl/ivg-demo/ by benchmarks/pack_demo_models.sh, else trained here
#             first) and on gpt2-xl-sized weights, IVG with a 2,048-token prompt per-beam against shared-prefix
#             attention (bench_decode.py --prompt-len 2048), 16 prompts decoded together against each alone in bf16
#             and float32 (batch_invariance.py: whether a prompt's tokens depend on its batch), one prompt's
#             decoding profiled (profile_decode.py; PROFILE_MODES names the modes, default eft). TARGETS_SKIP names
#             parts to leave out (smoke sampler diagnose tune kv beamgroup profile published spec-demo speculative
#             long invariance decode)
#   check     build csrc/ (JIT, ninja), then the GPU tests: the Triton kernels and the CUDA block copy against
#             the reference, CUDA-graph replay against eager, torch.compile, the decoder on CUDA against
#             the CPU result, paged models; then compute-sanitizer memcheck and racecheck (tests/sanitize_cuda.py)
#   bench     bench_sampling, bench_kv (with the beam-group attention rows) and bench_decode (also with a
#             2,048-token prompt) with --record: appends to benchmarks/results.csv,
#             re-renders benchmarks/RESULTS.md and draws benchmarks/results.png
#   speculative  bench_speculative on the GPU: the demo's trained models, then gpt2-xl-sized random
#             weights (bf16; fixed and adapting drafts), one prompt at a time (about 3 minutes; not part of "all")
#   flashinfer  FlashInfer beside this project's sampler and paged attention: bench_sampling (the
#             flashinfer providers at N 1, 16, 256 and V 151936, every warper setting) and bench_kv (its
#             flashinfer, flashinfer-per-beam and flashinfer-cascade rows). Needs .whl/flashinfer/ from
#             benchmarks/fetch_flashinfer.sh, carried to the machine; with the modules it built ahead of time
#             (where it had nvcc: benchmarks/flashinfer_aot.py) nothing compiles here, else FlashInfer
#             compiles its kernels on first use (minutes; not part of "all": those builds would eat the
#             bench timeouts)
#   published the published IVG code beside this decoder (bench_published --models gpt2-xl --device cuda,
#             64 prompts, bf16, modes ivg eft tokenrm cbs bon plain (PUBLISHED_MODES): several minutes, the
#             published side one prompt at a time over the first PUBLISHED_SIDE_PROMPTS, default 8): needs .published/ and .whl/published/ from
#             benchmarks/fetch_published_wheels.sh, carried to the machine (not part of "all")
# The test files that run only CPU code (decoder contracts, CLI, demo, block manager) are CI's job.
#
# What comes back goes to $OUT (default: ./gpu_suite_out), in at most four files, since the device tool returns eight
# at most: logs.tar.gz (every log; also unpacked in $LOGS, default /tmp/ivg_gpu_suite_logs), results.csv,
# RESULTS.md and results.png. They are refreshed after each part and stage, so a command stopped at its time limit
# still returns the logs and rows of the parts that ended. The tree may travel
# without .git: set IVG_BENCH_COMMIT to the commit the rows should name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT"
LOGS="${SUITE_LOGS:-/tmp/ivg_gpu_suite_logs}"
# A new device command starts with an empty $OUT: its logs start afresh; a second run of the suite in the same
# command (lease_plan.sh's third call) adds to them.
[ -f "$OUT/logs.tar.gz" ] || rm -rf "$LOGS"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STATUS=0
# The demo's trained models, carried (benchmarks/pack_demo_models.sh), instead of training them here first
if [ -z "${IVG_CACHE:-}" ] && ls -d .whl/ivg-demo/demo-* >/dev/null 2>&1; then
    export IVG_CACHE="$PWD/.whl/ivg-demo"
fi

note() { echo "== gpu_suite: $* ($(date -u +%H:%M:%S))"; }

deliver() {  # the logs as one archive and the results, into $OUT (each replaced whole: never half-written)
    local tmp="$OUT/.logs.$BASHPID.tmp"
    tar -C "$LOGS" -czf "$tmp" . 2>/dev/null && mv -f "$tmp" "$OUT/logs.tar.gz"
    rm -f "$tmp"
    local f
    for f in benchmarks/results.csv benchmarks/RESULTS.md benchmarks/results.png; do
        [ -f "$f" ] && cp "$f" "$OUT/.${f##*/}.tmp" && mv -f "$OUT/.${f##*/}.tmp" "$OUT/${f##*/}"
    done
    return 0
}
trap deliver EXIT

env_report() {
    note "environment"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__); print(torch.cuda.get_device_name(0))'
    command -v nvcc >/dev/null && nvcc --version | tail -1
}

GPU_TESTS="${GPU_TESTS:-tests/test_gpu.py tests/test_sampling_gpu.py tests/test_cuda_kernels.py tests/test_sampling_parity.py tests/test_attention_kernels.py
           tests/test_shared_prefix_attention.py tests/test_speculative.py tests/test_speculative_kernels.py
           tests/test_paged_models.py tests/test_philox.py tests/test_sampling_errors.py tests/test_sampling_reference.py
           tests/test_cuda_build_dispatch.py tests/test_kernel_random_configs.py tests/test_model_families.py
           tests/test_model_random_configs.py tests/test_row_rope.py tests/test_planned_steps.py
           tests/test_eager_sample.py tests/test_eager_draft.py tests/test_eager_attention.py tests/test_sampling_exactness.py}"

run_build() {
    note "build csrc/"
    timeout "${BUILD_TIMEOUT:-180}" "$PY" -m ivg_kernels.build 2>&1 | tee "$LOGS/build.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
}

run_tests() {
    note "tests"
    # -v: each test's outcome is logged as it ends, so a run cut by its time limit still says which passed and failed
    # shellcheck disable=SC2086
    timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest -v -n "${TEST_WORKERS:-12}" --dist loadfile -p no:cacheprovider --timeout 240 -rfEs $GPU_TESTS \
        2>&1 | tee "$LOGS/tests.log" | tail -40
    [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
}

run_sanitize() {
    note "compute-sanitizer"
    if [ -f tests/sanitize_cuda.py ] && command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            timeout "${SANITIZE_TIMEOUT:-100}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
                "$PY" tests/sanitize_cuda.py > "$LOGS/sanitize_$tool.log" 2>&1
            local rc=$?
            tail -3 "$LOGS/sanitize_$tool.log"
            echo "compute-sanitizer $tool exit $rc"
            [ "$rc" -eq 0 ] || STATUS=1
        done
    else
        echo "no CUDA kernels to sanitize (tests/sanitize_cuda.py or compute-sanitizer missing)"
    fi
}

flashinfer_env() {
    # FlashInfer from .whl/flashinfer/ (benchmarks/fetch_flashinfer.sh), unpacked once into its own folder
    local dir=/tmp/ivg-flashinfer
    ls .whl/flashinfer/flashinfer-*-trimmed.tar.xz >/dev/null 2>&1 || return 1
    if [ ! -d "$dir/flashinfer" ]; then
        mkdir -p "$dir" && tar -C "$dir" -xJf .whl/flashinfer/flashinfer-*-trimmed.tar.xz \
            && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$dir" .whl/flashinfer/*.whl \
            || { echo "flashinfer: could not unpack .whl/flashinfer/"; return 1; }
    fi
    case ":${PYTHONPATH:-}:" in *":$dir:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$dir" ;; esac
    # (the modules benchmarks/flashinfer_aot.py built ahead of time, which FlashInfer loads instead of compiling)
    "$PY" -c 'import flashinfer.sampling, flashinfer.decode, flashinfer.cascade; from flashinfer.jit import env
aot = sorted(p.name for p in env.FLASHINFER_AOT_DIR.glob("*/*.so"))
print("flashinfer", flashinfer.__version__, "prebuilt modules:", len(aot), *aot)'
}

run_flashinfer() {
    note "FlashInfer beside this project (its kernels prebuilt, or compiled on first use)"
    if ! flashinfer_env; then
        echo "flashinfer: .whl/flashinfer/ missing or unusable: run benchmarks/fetch_flashinfer.sh where there is" \
             "network and carry .whl"
        STATUS=1
        return
    fi
    timeout "${FI_SAMPLING_TIMEOUT:-300}" "$PY" benchmarks/bench_sampling.py --n 1 16 256 --v 151936 \
        --rows flat peaked ranked --providers triton triton-graph flashinfer flashinfer-graph torch-composition empty-op \
        --record 2>&1 | tee "$LOGS/bench_flashinfer_sampling.log" | tail -40
    [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
    timeout "${FI_KV_TIMEOUT:-240}" "$PY" benchmarks/bench_kv.py --record 2>&1 | tee "$LOGS/bench_flashinfer_kv.log" \
        | tail -30
    [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
}

run_bench() {
    note "bench_sampling"
    timeout "${SAMPLING_TIMEOUT:-200}" "$PY" benchmarks/bench_sampling.py --record ${SAMPLING_ARGS:-} 2>&1 | tee "$LOGS/bench_sampling.log" | tail -40 || STATUS=1
    note "bench_kv"
    timeout "${KV_TIMEOUT:-120}" "$PY" benchmarks/bench_kv.py --record 2>&1 | tee "$LOGS/bench_kv.log" | tail -30 || STATUS=1
    note "bench_decode"
    timeout "${DECODE_TIMEOUT:-300}" "$PY" benchmarks/bench_decode.py --record 2>&1 | tee "$LOGS/bench_decode.log" \
        | tail -20 || STATUS=1
    note "bench_loop_host: the decode loop's host work per chunk boundary at 1,024 rows, on this machine's CPU"
    OMP_NUM_THREADS=1 timeout "${LOOP_HOST_TIMEOUT:-60}" "$PY" benchmarks/bench_loop_host.py --record 2>&1 \
        | tee "$LOGS/bench_loop_host.log" | tail -7 || STATUS=1
    note "bench_decode: beam groups with a 2,048-token prompt (per-beam against shared-prefix attention)"
    timeout "${LONG_TIMEOUT:-240}" "$PY" benchmarks/bench_decode.py --prompt-len 2048 --prompts 1 --modes ivg \
        --skip-naive --record 2>&1 | tee "$LOGS/bench_decode_long.log" | tail -8 || STATUS=1
    local gpus
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    if [ "$gpus" -gt 1 ]; then
        note "bench_distributed on $gpus GPUs"
        timeout "${DIST_TIMEOUT:-240}" "$PY" benchmarks/bench_distributed.py --device cuda --ranks "$gpus" --repeats 1 \
            --record 2>&1 | tee "$LOGS/bench_distributed.log" | tail -8 || STATUS=1
    else
        echo "bench_distributed: one GPU here, the multi-GPU scaling check was not run"
    fi
    "$PY" benchmarks/plot_results.py || STATUS=1
}

run_speculative() {
    note "bench_speculative: the demo's trained models"
    timeout "${SPEC_TIMEOUT:-150}" "$PY" benchmarks/bench_speculative.py --device cuda --prompts 16 --record 2>&1 \
        | tee "$LOGS/bench_speculative.log" | tail -10 || STATUS=1
    note "bench_speculative: gpt2-xl-sized random weights"
    timeout "${SPEC_XL_TIMEOUT:-240}" "$PY" benchmarks/bench_speculative.py --device cuda --models gpt2-xl \
        --prompts 8 --gammas 2 4 --adapt --work /tmp/pubwork --record 2>&1 | tee "$LOGS/bench_speculative_xl.log" \
        | tail -8 || STATUS=1
}

run_published() {
    note "bench_published: the published IVG code beside this decoder (gpt2-xl-sized random weights, bf16)"
    if [ ! -d .published/inference_time_alignment ] || ! ls .whl/published/*.whl >/dev/null 2>&1; then
        echo "bench_published: .published/ or .whl/published/ missing: run benchmarks/fetch_published_wheels.sh" \
             "where there is network and carry both"
        STATUS=1
        return
    fi
    # The published code's pinned packages go to their own folder, seen only by its interpreter wrapper.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pubsite \
        .whl/published/*.whl || { STATUS=1; return; }
    printf '#!/bin/sh\nPYTHONPATH=/tmp/pubsite${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' "$(command -v "$PY")" \
        > /tmp/pubpython
    chmod +x /tmp/pubpython
    # shellcheck disable=SC2086
    timeout "${PUBLISHED_TIMEOUT:-560}" "$PY" benchmarks/bench_published.py --published .published \
        --python /tmp/pubpython --models "${PUBLISHED_MODELS:-gpt2-xl}" --device cuda \
        --modes ${PUBLISHED_MODES:-ivg eft tokenrm cbs bon plain} --prompts "${PUBLISHED_PROMPTS:-64}" \
        --published-prompts "${PUBLISHED_SIDE_PROMPTS:-8}" --greedy-prompts 4 \
        --latency 4 --repeats 1 --threads 4 --work /tmp/pubwork --record 2>&1 | tee "$LOGS/bench_published.log" \
        | tail -30
    [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
}

# The targets stage shares one deadline (TARGETS_BUDGET seconds, default 530): each part gets the lesser of its
# own limit and what is left, and a part with under 20 seconds left is skipped with a line saying so.
left_for() {
    local cap=$1 rest=$((TARGETS_DEADLINE - SECONDS - 5))
    [ "$rest" -lt "$cap" ] && cap=$rest
    echo "$cap"
}

timed() {  # timed NAME CAP LOG CMD...: run CMD under min(CAP, what is left), its output to $LOGS/LOG
    local name=$1 cap limit log=$3
    limit=$(left_for "$2")
    shift 3
    if [ "$limit" -lt 20 ]; then
        echo "targets: $name skipped, ${limit}s left of the budget"
        STATUS=1
        return 1
    fi
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$log" | tail -30
    local rc=${PIPESTATUS[0]}
    deliver
    [ "$rc" -eq 0 ] || { echo "targets: $name exit $rc (limit ${limit}s)"; STATUS=1; }
    return "$rc"
}

wanted() {  # wanted PART: not named in TARGETS_SKIP
    case " ${TARGETS_SKIP:-} " in *" $1 "*) echo "targets: $1 skipped (TARGETS_SKIP)"; return 1 ;; esac
}

run_targets() {
    TARGETS_DEADLINE=$((SECONDS + ${TARGETS_BUDGET:-530}))
    if wanted smoke; then
        note "targets: GPU tests: the eager launch paths, the decoder, and the kernels against the reference"
        # shellcheck disable=SC2086
        timed "GPU tests" "${SMOKE_TIMEOUT:-180}" targets_smoke.log \
            "$PY" -m pytest -v -n "${TEST_WORKERS:-12}" --dist loadfile -p no:cacheprovider --timeout 100 -rfEs \
            tests/test_sampling_gpu.py tests/test_gpu.py ${T_KERNEL_TESTS:-tests/test_attention_kernels.py
            tests/test_shared_prefix_attention.py tests/test_speculative_kernels.py tests/test_sampling_parity.py
            tests/test_paged_models.py tests/test_model_families.py} \
            || echo "targets: GPU tests failed (log targets_smoke.log); measuring anyway (rows not to be quoted)"
        # whole-step graphs (ivg.step_graphs, ivg.round_graphs) first captured on a GPU here: if their tests
        # failed, the decoder benchmarks below measure the per-model steps the earlier runs measured
        if grep -qE "FAILED .*test_gpu.py::test_(whole_steps|speculative_verifications)" "$LOGS/targets_smoke.log"; then
            export IVG_STEP_GRAPHS=0
            echo "targets: whole-step graph tests failed: IVG_STEP_GRAPHS=0 for the decoder benchmarks"
        fi
    fi
    local fi_providers=""
    flashinfer_env >/dev/null 2>&1 && fi_providers="flashinfer flashinfer-graph"
    if wanted sampler; then
        note "targets: sampler (issue 11)"
        # shellcheck disable=SC2086
        timed "sampler" "${T_SAMPLING_TIMEOUT:-150}" targets_sampling.log \
            "$PY" benchmarks/bench_sampling.py --n 1 256 --v 151936 --rows peaked ranked \
            --configs imdb alpaca top-p-0.9 top-p-0.95 min-p-0.05 \
            --providers triton triton-graph torch-composition empty-op $fi_providers --record
    fi
    if wanted diagnose; then
        note "targets: which rows cost top-p its time at N=256 (issue 11)"
        timed "top-p diagnosis" "${T_DIAG_TIMEOUT:-45}" targets_diagnose_top_p.log \
            "$PY" benchmarks/diagnose_top_p.py --n 256 --v 151936 --rows peaked --pool-max 4194304
    fi
    if wanted tune; then
        note "targets: stage 1 of the sampler with 8 or 4 warps per slice of 4,096, 16 or 8 candidates (issue 11)"
        timed "stage-1 warps" "${T_TUNE_TIMEOUT:-60}" targets_tune_stage1.log \
            "$PY" benchmarks/tune_stage1.py --rounds 2 --candidates ${TUNE_CANDIDATES:-16 8}
    fi
    if wanted kv; then
        note "targets: paged attention (issue 13)"
        timed "paged attention" "${T_KV_TIMEOUT:-80}" targets_kv.log "$PY" benchmarks/bench_kv.py --record
    fi
    if wanted beamgroup; then
        note "targets: where the beam-group attention's time goes, kernel by kernel, over its plans (issue 13)"
        timed "beam-group diagnosis" "${T_BEAM_TIMEOUT:-50}" targets_diagnose_beam_group.log \
            "$PY" benchmarks/diagnose_beam_group.py --splits 0 16 32 --tile-m 64 32 16
    fi
    if wanted profile; then
        note "targets: the eager calls' host time, profiled (issues 11 and 13)"
        timed "eager profile" "${T_PROFILE_TIMEOUT:-60}" targets_profile.log "$PY" benchmarks/profile_eager.py
    fi
    local pub_limit
    pub_limit=$(left_for "${T_PUBLISHED_TIMEOUT:-270}")
    if ! wanted published; then
        :
    elif [ "$pub_limit" -lt 20 ]; then
        echo "targets: the published code skipped, ${pub_limit}s left of the budget"
        STATUS=1
    elif [ -d .published/inference_time_alignment ] && ls .whl/published/*.whl >/dev/null 2>&1; then
        PUBLISHED_MODES="${PUBLISHED_MODES:-ivg eft}" PUBLISHED_PROMPTS="${PUBLISHED_PROMPTS:-64}" \
            PUBLISHED_TIMEOUT="$pub_limit" run_published
    else
        echo "targets: .published/ or .whl/published/ not carried: the comparison with the published code (issue 12) skipped"
    fi
    if wanted spec-demo; then
        note "targets: speculative decoding on the demo's trained models (issue 14)"
        timed "speculative, demo models" "${T_SPEC_DEMO_TIMEOUT:-90}" targets_speculative_demo.log \
            "$PY" benchmarks/bench_speculative.py --device cuda --prompts 16 --gammas 4 --record
    fi
    if wanted speculative; then
        note "targets: speculative decoding on gpt2-xl-sized random weights (issue 14)"
        timed "speculative" "${T_SPEC_TIMEOUT:-90}" targets_speculative.log \
            "$PY" benchmarks/bench_speculative.py --device cuda --models gpt2-xl \
            --modes eft ivg --prompts 4 --gammas 4 --work /tmp/pubwork --record
    fi
    if wanted long; then
        note "targets: IVG with a 2,048-token prompt, per-beam against shared-prefix attention, end to end (issue 13)"
        timed "beam groups end to end" "${T_LONG_TIMEOUT:-150}" targets_decode_long.log \
            "$PY" benchmarks/bench_decode.py --prompt-len 2048 --prompts 1 --modes ivg --skip-naive --record
    fi
    if wanted invariance; then
        note "targets: prompts decoded together against each alone, bf16 and float32, gpt2-xl-sized random weights"
        local dt
        for dt in bfloat16 float32; do
            timed "batch invariance ($dt)" "${T_INVARIANCE_TIMEOUT:-150}" "targets_invariance_$dt.log" \
                "$PY" benchmarks/batch_invariance.py --models gpt2-xl --device cuda --dtype "$dt" --prompts 16 \
                --modes eft ivg --work /tmp/pubwork --record
        done
    fi
    if wanted decode; then
        # PROFILE_MODES: the decoding modes profiled one after another (issue 12's time outside the forwards, per mode)
        local mode
        for mode in ${PROFILE_MODES:-eft}; do
            note "targets: one prompt's decoding profiled, mode $mode, gpt2-xl-sized random weights (issue 12)"
            timed "decode profile ($mode)" "${T_DECODE_PROFILE_TIMEOUT:-90}" "targets_decode_profile_$mode.log" \
                "$PY" benchmarks/profile_decode.py --models gpt2-xl --device cuda --work /tmp/pubwork --top 25 \
                --mode "$mode"
        done
    fi
}

env_report 2>&1 | tee "$LOGS/env.log"
[ $# -eq 0 ] && set -- all
for STAGE in "$@"; do
    case "$STAGE" in
        targets) run_targets ;;
        build) run_build ;;
        tests) run_tests ;;
        sanitize) run_sanitize ;;
        check) run_build; run_tests; run_sanitize ;;
        bench) run_bench ;;
        speculative) run_speculative ;;
        published) run_published ;;
        flashinfer) run_flashinfer ;;
        all) run_build; run_tests; run_sanitize; run_bench ;;
        *) echo "usage: $0 [targets|build|tests|sanitize|check|bench|speculative|published|flashinfer|all]..." >&2; exit 2 ;;
    esac
    deliver
done
note "done, status $STATUS"
exit $STATUS
