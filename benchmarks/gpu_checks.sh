#!/usr/bin/env bash
# The GPU checks of issue 15, each stage capped so that a stage that overruns still leaves
# its partial output (the benchmark writes its JSON after every trainer):
#   bench    clip_throughput.py --device cuda: open_clip_train eager and --torchcompile,
#            mmkit eager and train.compile (the first three took 340 s on an H100 with 16 cores)
#   tests    the GPU tests: a bf16 run, compiled and eager give the same losses (104 s there)
#   profile  profile_step.py on the eager mmkit recipe and the data the benchmark wrote, 12 steps
#   loading  loading.py with the benchmark's 12 workers: how many 224 px images/s the loader gives a
#            CPU run (normalised in the workers) and a GPU run (uint8 batches), against ImageFolder
# Output lands in the folder given (default gpu-checks/); name the stages to run (default all).
# A device call runs 10 minutes at most, so two calls, the second while the machine is warm:
#
#     bash benchmarks/gpu_checks.sh OUT bench
#     bash benchmarks/gpu_checks.sh OUT profile tests loading
set -u
SECONDS=0
out=${1:-gpu-checks}
shift || true
stages=${*:-bench tests profile loading}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MMKIT_PLUGINS=
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/device.txt"

if [[ " $stages " == *" bench "* ]]; then
    timeout "${BENCH_SECONDS:-560}" python3 benchmarks/clip_throughput.py --device cuda --folder /tmp/mmkit-bench \
        --json "$out/clip_throughput_cuda.json" > "$out/benchmark.log" 2>&1
    echo "benchmark exit $? at ${SECONDS} s"; grep -v "^loss\|^numbers written" "$out/benchmark.log" | tail -25
fi
if [[ " $stages " == *" tests "* ]]; then
    timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -m gpu tests/test_engine.py -p no:cacheprovider \
        > "$out/gpu_tests.log" 2>&1
    echo "gpu tests exit $? at ${SECONDS} s"; tail -6 "$out/gpu_tests.log"
fi
recipe=$(ls /tmp/mmkit-bench/mmkit-*.toml 2>/dev/null | head -1)  # the eager mmkit run's recipe
if [[ " $stages " == *" profile "* && -z "$recipe" ]]; then
    echo "profile skipped: no benchmark recipe in /tmp/mmkit-bench (run the bench stage on this machine first)"
elif [[ " $stages " == *" profile "* ]]; then
    timeout "${PROFILE_SECONDS:-90}" python3 benchmarks/profile_step.py "$recipe" train.max_steps=12 --rows 20 \
        --out "$out/profile.txt" > "$out/profile.log" 2>&1
    echo "profile exit $? at ${SECONDS} s"; head -8 "$out/profile.txt" 2>/dev/null || tail -5 "$out/profile.log"
fi
if [[ " $stages " == *" loading "* ]]; then
    timeout "${LOADING_SECONDS:-120}" python3 benchmarks/loading.py --workers 12 --images 4000 --repeats 2 \
        --json "$out/loading.json" > "$out/loading.log" 2>&1
    echo "loading exit $? at ${SECONDS} s"; grep -A4 "^loader" "$out/loading.log" || tail -5 "$out/loading.log"
fi
