"""One training step's math as a plain function: conditioning, noising, UNet prediction, loss."""

from __future__ import annotations

from typing import Any

import torch

from lora_trainer.fit.objective import denoising_loss, prediction_target
from lora_trainer.model.conditioning import CaptionEncoder


def training_step(
    unet: torch.nn.Module,
    encode_captions: CaptionEncoder,
    noise_scheduler: Any,
    batch: dict[str, Any],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The loss of one batch for given noise and timesteps (the caller draws them, so tests can fix them)."""
    latents = batch["latents"]
    context, pooled = encode_captions(batch["captions"])
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=context,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(latents.device)},
    ).sample
    target = prediction_target(noise_scheduler, latents, noise, timesteps, noise_scheduler.config.prediction_type)
    return denoising_loss(prediction, target, batch.get("loss_weights"))
