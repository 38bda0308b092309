#!/usr/bin/env bash
# The GPU figures of results.md in one go, under 8 minutes on one H100/H200 (each configuration has its own
# timeout, so one that hangs costs only its own minutes):
#   bash benchmarks/gpu_suite.sh            # every configuration
#   bash benchmarks/gpu_suite.sh speed-b4   # the named ones only
# Needs the project's dependencies importable (pip install -e '.[test]' on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
work=${LORA_TRAIN_BENCH_WORK:-/tmp/lora-train-speed}
sdxl="--model sdxl-random --resolution 1024"
speed="python3 benchmarks/speed.py --model sdxl-random --work $work --rank 32 --mixed-precision bf16 --steps 3 8 --runs 1"

# name | timeout in seconds | command
configurations=(
  "memory-b1|80|python3 benchmarks/train_step.py $sdxl --mixed-precision bf16 --gradient-checkpointing --optimizer adamw8bit --steps 5 && python3 benchmarks/train_step.py $sdxl --mixed-precision bf16 --steps 5"
  "best-batch|90|python3 benchmarks/train_step.py $sdxl --mixed-precision bf16 --batch-size 8 --steps 5 && python3 benchmarks/train_step.py $sdxl --mixed-precision bf16 --batch-size 8 --compile --channels-last --steps 5"
  "speed-b4|150|$speed --batch-size 4"
  "compile-b4|120|$speed --batch-size 4 --no-bare --no-warmup --set training.compile=true --set training.channels_last=true"
)
# The GPU tests (about 5 minutes) are apart: python3 -m pytest -m gpu tests/test_gpu.py -s -q

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes as b
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)"
# The SDXL-sized random model folder the speed runs train on (about 7 GB, a minute to write), outside any timeout.
python3 -c "import sys; sys.path[:0] = ['benchmarks', '.']
from pathlib import Path; from bench_models import model_folder; print('model', model_folder('sdxl-random', Path('$work')))"

for entry in "${configurations[@]}"; do
    IFS="|" read -r name seconds command <<<"$entry"
    if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
    echo "== $name (up to $seconds s): $command"
    start=$(date +%s)
    timeout "$seconds" bash -c "$command" || echo "FAILED or timed out: $name"
    echo "== $name took $(( $(date +%s) - start )) s"
done
