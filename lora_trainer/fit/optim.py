"""The optimizer over the adapters' parameter groups, and the learning-rate schedule, from the training config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lora_trainer.adapters.wiring import trainable_parameters
from lora_trainer.config.schema import Config
from lora_trainer.config.training import TrainingConfig
from lora_trainer.errors import UserError


def make_optimizer(groups: Sequence[dict[str, Any]], config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over parameter `groups` (each `{"params": [...], "lr": ...}`), from torch or bitsandbytes."""
    options = {"lr": config.learning_rate, "betas": config.adam_betas, "eps": config.adam_epsilon, "weight_decay": config.weight_decay}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, **options)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except Exception as error:  # bitsandbytes raises various errors when its native library is missing
            raise UserError(
                f"training.optimizer: adamw8bit needs bitsandbytes, which failed to load ({error}); "
                "install it (pip install bitsandbytes) or use adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit(groups, **options)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def parameter_groups(trained: dict[str, torch.nn.Module], config: Config) -> list[dict[str, Any]]:
    """One group for the UNet's adapters and one for both text encoders', each with its learning rate."""
    text_encoder_lr = config.network.text_encoder_learning_rate or config.training.learning_rate
    groups = []
    if "unet" in trained:
        groups.append({"name": "unet", "params": trainable_parameters(trained["unet"]), "lr": config.training.learning_rate})
    text_parameters = [p for part, model in trained.items() if part != "unet" for p in trainable_parameters(model)]
    if text_parameters:
        groups.append({"name": "text_encoder", "params": text_parameters, "lr": text_encoder_lr})
    return groups


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int):
    """The configured schedule over `total_steps` optimizer steps, stepped once per optimizer step by the loop
    (not through Accelerate, whose prepared schedule steps once per process: its position would then depend
    on the number of processes, and a run could not resume on another number)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )


def learning_rate_at(config: TrainingConfig, total_steps: int, step: int) -> float:
    """The UNet's learning rate in optimizer step `step` (counted from 1) of a run of `total_steps`."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    return config.learning_rate * make_lr_scheduler(probe, config, total_steps).lr_lambdas[0](step - 1)
