#!/usr/bin/env bash
# Every GPU figure in results.md and the GPU tests, in one go (a few minutes on one H100/H200):
#   bash benchmarks/gpu_suite.sh
# Needs the project's dependencies importable (pip install -e '.[test]' on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes as b
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)"

echo "== half precision vs fp32, one LoRA step"
python3 benchmarks/precision_check.py --batch-size 16
python3 benchmarks/precision_check.py --model sdxl-random --resolution 1024 --batch-size 1

echo "== SDXL-sized UNet, one LoRA step at 1024 px"
sdxl="--model sdxl-random --resolution 1024 --steps 10"
for options in \
    "--mixed-precision bf16 --gradient-checkpointing" \
    "--mixed-precision bf16 --gradient-checkpointing --optimizer adamw8bit" \
    "--mixed-precision bf16" \
    "--mixed-precision fp16 --gradient-checkpointing" \
    "--mixed-precision bf16 --gradient-checkpointing --optimizer adamw8bit --batch-size 4"; do
    timeout 180 python3 benchmarks/train_step.py $sdxl $options || echo "FAILED: train_step.py $sdxl $options"
done

echo "== GPU tests"
python3 -m pytest -m gpu tests/test_gpu.py -s -q -p no:cacheprovider
