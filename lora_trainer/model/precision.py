"""Mixed precision: what `auto` means on this machine, and the dtype frozen weights are kept in."""

from __future__ import annotations

import logging

import torch

from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(setting: str) -> str:
    """`auto` -> bf16 on a CUDA GPU that supports it, fp16 on other GPUs, no (fp32) on CPU."""
    if setting == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and not torch.cuda.is_available():
        # Accelerate autocasts to fp16 only on GPUs; on a CPU fp16 weights would meet fp32 inputs.
        raise ConfigError("training.mixed_precision: fp16 needs a CUDA GPU; on this machine use no (or bf16, slowly)")
    if setting == "bf16" and not torch.cuda.is_available():
        log.warning(
            "training.mixed_precision is bf16 but there is no CUDA GPU: on CPUs without native bf16 "
            "support its matrix products are many times slower than fp32 (set it to no)"
        )
    return setting


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """Frozen base weights are stored in the training precision to halve their memory; adapters stay fp32."""
    return WEIGHT_DTYPES[mixed_precision]
