"""A held-out loss that is comparable from one evaluation to the next.

Training loss jumps with the random timesteps and noise of each batch, so it cannot show when a LoRA
starts to overfit. Here every evaluation measures the same images at the same fixed timesteps with the
same noise (seeded per image and timestep), so the only thing that changes is the LoRA.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from lora_trainer.cache.fill import ValidationSet
from lora_trainer.fit.step import training_step
from lora_trainer.model.conditioning import CaptionEncoder, time_ids


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    encode_captions: CaptionEncoder,
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
    items = [validation.items[index] for index in chunk]
    return {
        "latents": torch.stack([item.latent.load() for item in items]).to(device),
        "captions": [validation.captions[index] for index in chunk],
        "time_ids": torch.stack([time_ids(item.plan.original, item.plan.crop_top_left, item.plan.bucket) for item in items]).to(device),
    }


def _fixed_noise(shape: torch.Size, seed: int, index: int, position: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1_009 + position)
    return torch.randn(shape, generator=generator)
