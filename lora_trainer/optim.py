"""Optimizer and learning-rate schedule from the training config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lora_trainer.config import TrainingConfig
from lora_trainer.errors import UserError


def make_optimizer(parameter_groups: Sequence[dict[str, Any]], config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups` (each `{"params": [...], "lr": ...}`), from torch or bitsandbytes."""
    options = {"lr": config.learning_rate, "betas": config.betas, "eps": config.epsilon, "weight_decay": config.weight_decay}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameter_groups, **options)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except Exception as error:  # bitsandbytes raises various errors when its native library is missing
            raise UserError(
                f"training.optimizer: adamw8bit needs bitsandbytes, which failed to load ({error}); "
                "install it (pip install bitsandbytes) or use adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit(parameter_groups, **options)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int, num_processes: int):
    """The configured schedule over `total_steps` optimizer steps.

    Accelerate's prepared scheduler advances once per process for every optimizer step, so
    warmup and length are counted in process-steps.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )
