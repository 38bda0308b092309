"""Mixed precision: what `auto` means on this machine, and the dtype frozen weights are kept in."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(setting: str) -> str:
    """`auto` -> bf16 on a CUDA GPU that supports it, fp16 on other GPUs, no (fp32) on CPU."""
    if setting == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting != "no" and not torch.cuda.is_available():
        log.warning(
            "training.mixed_precision is %s but there is no CUDA GPU: on CPUs without native support "
            "half-precision matrix products are many times slower than fp32 (set it to no)",
            setting,
        )
    return setting


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """Frozen base weights are stored in the training precision to halve their memory; adapters stay fp32."""
    return WEIGHT_DTYPES[mixed_precision]
