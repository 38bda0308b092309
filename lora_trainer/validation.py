"""A held-out loss that is comparable from one evaluation to the next.

Training loss jumps with the random timesteps and noise of each batch, so it cannot show when a LoRA
starts to overfit. Here every evaluation measures the same images at the same fixed timesteps with the
same noise (seeded per image and timestep), so the only thing that changes is the LoRA.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_trainer.config import Config, DatasetConfig
from lora_trainer.data.captions import fixed_caption
from lora_trainer.data.dataset import TrainingItem
from lora_trainer.errors import UserError
from lora_trainer.step import training_step


@dataclass(frozen=True)
class ValidationSet:
    items: list[TrainingItem]  # each with cached latents
    captions: list[str]  # without caption randomness, so every evaluation sees the same text


def hold_out(items: Sequence[TrainingItem], fraction: float, seed: int) -> tuple[list[TrainingItem], list[TrainingItem]]:
    """(training items, held-out items): a seeded `fraction` of the training images (never regularization ones)."""
    candidates = [index for index, item in enumerate(items) if not item.record.is_reg]
    count = max(1, round(len(candidates) * fraction))
    if count >= len(candidates):
        raise UserError(
            f"validation.fraction: holding out {count} of {len(candidates)} training images leaves none to train on; "
            "lower it or give validation.path"
        )
    chosen = set(random.Random(f"validation:{seed}").sample(candidates, count))
    kept = [item for index, item in enumerate(items) if index not in chosen]
    return kept, [items[index] for index in sorted(chosen)]


def validation_config(config: Config) -> Config:
    """The config with `validation.path` as its only dataset, for preparing those images like training ones."""
    data = config.data.model_copy(update={"cache_latents": True})
    return config.model_copy(update={"datasets": [DatasetConfig(path=config.validation.path)], "data": data})


def validation_set(items: Sequence[TrainingItem], datasets: Sequence[DatasetConfig]) -> ValidationSet:
    captions = [fixed_caption(item.record.caption, datasets[item.record.dataset_index]) for item in items]
    return ValidationSet(list(items), captions)


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    encode_captions: Callable,
    noise_scheduler: Any,
    validation: ValidationSet,
    timesteps: Sequence[int],
    seed: int,
    device: torch.device,
    batch_size: int = 4,
) -> float:
    """Mean denoising loss over every held-out image at every fixed timestep, with fixed noise."""
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, item in enumerate(validation.items):
        by_bucket[item.plan.bucket].append(index)
    total, count = 0.0, 0
    for position, timestep in enumerate(timesteps):
        for indices in by_bucket.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = _batch(validation, chunk, device)
                noise = torch.stack([_fixed_noise(batch["latents"][0].shape, seed, index, position) for index in chunk])
                steps = torch.full((len(chunk),), timestep, dtype=torch.long, device=device)
                loss = training_step(unet, encode_captions, noise_scheduler, batch, noise.to(device), steps)
                total += loss.item() * len(chunk)
                count += len(chunk)
    return total / count


def _batch(validation: ValidationSet, chunk: Sequence[int], device: torch.device) -> dict[str, Any]:
    from lora_trainer.conditioning import time_ids

    items = [validation.items[index] for index in chunk]
    return {
        "latents": torch.stack([item.upright.load() for item in items]).to(device),
        "captions": [validation.captions[index] for index in chunk],
        "time_ids": torch.stack([time_ids(item.plan.original, item.plan.crop_top_left, item.plan.bucket) for item in items]).to(device),
    }


def _fixed_noise(shape: torch.Size, seed: int, index: int, position: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1_009 + position)
    return torch.randn(shape, generator=generator)


def prepare_validation(config: Config, data: Any, device: torch.device, show_progress: bool) -> ValidationSet | None:
    """The held-out images (taken out of `data.items` for `fraction`), with cached latents; None when off."""
    from lora_trainer.data.pipeline import prepare_training_data, with_cached_latents
    from lora_trainer.models import load_vae

    settings = config.validation
    if not settings.enabled:
        return None
    if settings.fraction:
        data.items, held_out = hold_out(data.items, settings.fraction, settings.seed)
        if any(item.upright is None for item in held_out):  # training encodes every step; these need a cache
            planned = [(item.record, item.plan) for item in held_out]
            held_out, _ = with_cached_latents(planned, config, device, load_vae(config.model), show_progress)
        return validation_set(held_out, config.datasets)
    separate = validation_config(config)
    items = prepare_training_data(separate, device, lambda: load_vae(config.model), show_progress).items
    return validation_set(items, separate.datasets)
