#!/usr/bin/env bash
# The GPU checks of issue 15 in one go, each stage capped so the later ones still run:
# the throughput benchmark (open_clip_train eager and --torchcompile, mmkit eager and
# train.compile), the GPU tests (compiled and eager give the same losses), and a profile of
# mmkit's eager training steps. Everything lands in the folder given (default gpu-checks/).
#
#     bash benchmarks/gpu_checks.sh [output folder]
set -u
SECONDS=0
out=${1:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MMKIT_PLUGINS=
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/device.txt"

timeout "${BENCH_SECONDS:-340}" python3 benchmarks/clip_throughput.py --device cuda --folder /tmp/mmkit-bench \
    --json "$out/clip_throughput_cuda.json" > "$out/benchmark.log" 2>&1
echo "benchmark exit $? at ${SECONDS} s"; grep -v "^loss" "$out/benchmark.log" | tail -25

timeout "${TEST_SECONDS:-140}" python3 -m pytest -q -m gpu tests/test_engine.py -p no:cacheprovider \
    > "$out/gpu_tests.log" 2>&1
echo "gpu tests exit $? at ${SECONDS} s"; tail -6 "$out/gpu_tests.log"

recipe=$(ls /tmp/mmkit-bench/mmkit-*.toml 2>/dev/null | head -1)  # the eager mmkit run's recipe
if [ -n "$recipe" ]; then
    timeout "${PROFILE_SECONDS:-60}" python3 benchmarks/profile_step.py "$recipe" train.max_steps=40 --rows 20 \
        --out "$out/profile.txt" > "$out/profile.log" 2>&1
    echo "profile exit $? at ${SECONDS} s"; head -8 "$out/profile.txt" 2>/dev/null || tail -5 "$out/profile.log"
fi
