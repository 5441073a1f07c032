#!/usr/bin/env bash
# The GPU checks of issue 15, each stage capped so that a stage that overruns still leaves
# its partial output (the benchmark writes its JSON after every trainer):
#   tests    the GPU tests of tests/test_engine.py: a bf16 run, compiled (CUDA graphs too) and
#            eager give the same losses and profile their last steps on the device, a step never
#            waits for the device, images normalised on the GPU as on the CPU (150 s on the H200)
#   bench    clip_throughput.py --device cuda: open_clip_train eager and --torchcompile, mmkit
#            train.compile ("reduce-overhead") and eager, in that order (310 s on an H200 with 16
#            cores, 2026-11-27, the whole script 460 s); its
#            "compile:" line must show cudagraph_skips 0, its "profile:" line how busy the device
#            was in each mmkit run's last 6 steps (their ops tables land beside the JSON). After
#            failed tests it profiles nothing: a profiler at odds with CUDA graphs must not cost
#            the rates
#   loading  loading.py with the benchmark's 12 workers and 224 px JPEGs taken whole (as the bench's
#            are): how many images/s the loader gives a CPU run (normalised in the workers) and a GPU
#            run (uint8 batches), against ImageFolder
# Output lands in the folder given (default gpu-checks/); name the stages to run (default tests
# and bench, in that order). A device call runs 10 minutes at most and a session may have
# only one, so the stages share TOTAL_SECONDS (default 580): each is capped at its own limit and
# at what is left, and a stage with less than a minute left is skipped and says so.
#
#     bash benchmarks/gpu_checks.sh OUT                    # tests, bench
#     bash benchmarks/gpu_checks.sh OUT loading            # the loader alone
set -u
SECONDS=0
out=${1:-gpu-checks}
shift || true
stages=${*:-tests bench}
total=${TOTAL_SECONDS:-580}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MMKIT_PLUGINS=

# capped NAME CAP LOG COMMAND...: run COMMAND (output to LOG) for at most CAP seconds or what is
# left of the total, whichever is less, then SIGTERM (and SIGKILL 15 s later: a trainer finishes
# its step and a checkpoint first); skip it with less than a minute left. Its exit status is
# COMMAND's; the script's is the last failed stage's.
status=0
capped() {
    local name=$1 cap=$2 log=$3 left=$((total - SECONDS)) rc
    shift 3
    if ((left < 60)); then echo "$name skipped: ${left} s left of ${total}"; status=1; return 1; fi
    timeout -k 15 $((left < cap ? left : cap > 0 ? cap : 1)) "$@" > "$log" 2>&1
    rc=$?
    echo "$name exit $rc at ${SECONDS} s"
    ((rc == 0)) || status=$rc
    return $rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/device.txt"

tests_failed=
if [[ " $stages " == *" tests "* ]]; then
    # TORCH_LOGS=cudagraphs: a failing test's captured log says why a graph ran without CUDA graphs
    capped "gpu tests" "${TEST_SECONDS:-170}" "$out/gpu_tests.log" env TORCH_LOGS=cudagraphs \
        python3 -m pytest -q -m gpu tests/test_engine.py -p no:cacheprovider || tests_failed=1
    tail -6 "$out/gpu_tests.log" 2>/dev/null
fi
if [[ " $stages " == *" bench "* ]]; then
    capped benchmark "${BENCH_SECONDS:-440}" "$out/benchmark.log" python3 benchmarks/clip_throughput.py \
        --device cuda --folder /tmp/mmkit-bench --json "$out/clip_throughput_cuda.json" \
        ${tests_failed:+--profile 0}
    grep -v "^loss\|^numbers written" "$out/benchmark.log" 2>/dev/null | tail -25
fi
if [[ " $stages " == *" loading "* ]]; then
    capped loading "${LOADING_SECONDS:-120}" "$out/loading.log" python3 benchmarks/loading.py --workers 12 \
        --images 4000 --repeats 2 --image-size 224 --crop 224 --json "$out/loading.json"
    grep -A4 "^loader" "$out/loading.log" 2>/dev/null || tail -5 "$out/loading.log" 2>/dev/null
fi
exit $status
