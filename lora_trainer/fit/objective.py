"""The denoising objective: noise and timesteps, the prediction target, and the loss.

    noisy  = sqrt(abar_t) * latents + sqrt(1 - abar_t) * noise          (scheduler.add_noise)
    target = noise                                          (epsilon)
           = sqrt(abar_t) * noise - sqrt(1 - abar_t) * latents  (v_prediction; scheduler.get_velocity)
    loss   = mean over the batch of weight_i * (per-sample mean squared error), in fp32
             (weight_i: the image's dataset loss_weight, e.g. for regularization images; as kohya weighs)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def draw_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise shaped like `latents`, and one uniform integer timestep in [0, T) per sample."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    return noise, timesteps


def seeded_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and a uniform timestep for each sample from its own seed (`fit.batches.noise_seed`): what one
    image gets does not depend on its batch mates, the process it landed on, or where a run resumed."""
    noises, timesteps = [], []
    for seed in seeds:
        generator = torch.Generator(device=latents.device).manual_seed(seed)
        noises.append(torch.randn(latents.shape[1:], generator=generator, device=latents.device, dtype=latents.dtype))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator, device=latents.device))
    return torch.stack(noises), torch.cat(timesteps)


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()
