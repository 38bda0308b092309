"""One training step's math as a plain function: conditioning, noising, UNet prediction, loss."""

from __future__ import annotations

from typing import Any

import torch

from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.fit.losses import denoising_loss
from lora_trainer.fit.objective import prediction_target
from lora_trainer.model.conditioning import CaptionEncoder

SDXL_OBJECTIVE = ObjectiveConfig()
"""Every objective setting at its default: plain MSE, no timestep weighting, no mask (what validation measures)."""


def training_step(
    unet: torch.nn.Module,
    encode_captions: CaptionEncoder,
    noise_scheduler: Any,
    batch: dict[str, Any],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    objective: ObjectiveConfig | None = None,
    input_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of one batch for given noise and timesteps (the caller draws them, so tests can fix them).

    `input_noise` (input perturbation, Ning et al. 2023, arXiv:2301.11706) replaces `noise` in the noisy latents
    only: the target stays computed from `noise`. `objective` None is SDXL's own objective (`SDXL_OBJECTIVE`)."""
    latents = batch["latents"]
    context, pooled = encode_captions(batch["captions"])
    noisy_latents = noise_scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    prediction = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=context,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(latents.device)},
    ).sample
    prediction_type = noise_scheduler.config.prediction_type
    target = prediction_target(noise_scheduler, latents, noise, timesteps, prediction_type)
    return denoising_loss(
        prediction,
        target,
        timesteps,
        noise_scheduler.alphas_cumprod,
        prediction_type,
        objective if objective is not None else SDXL_OBJECTIVE,
        loss_weights=batch.get("loss_weights"),
        loss_masks=batch.get("loss_masks"),
    )
