"""The denoising objective: noise and timesteps, the prediction target, and the loss.

    noisy  = sqrt(abar_t) * latents + sqrt(1 - abar_t) * noise          (scheduler.add_noise)
    target = noise                                          (epsilon)
           = sqrt(abar_t) * noise - sqrt(1 - abar_t) * latents  (v_prediction; scheduler.get_velocity)

The loss (loss types, masks, per-sample and timestep weights) is `fit.losses.denoising_loss`. Each image's noise
and timestep come from `draw_training_noise`: the noise extras are in `fit.noise`, the distributions in
`fit.timesteps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.fit.noise import offset_noise, perturbed_input_noise, pyramid_noise, uniform_strength
from lora_trainer.fit.timesteps import draw_timesteps


def draw_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise shaped like `latents`, and one uniform integer timestep in [0, T) per sample."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    return noise, timesteps


@dataclass(frozen=True)
class NoiseDraw:
    """One batch's noise and timesteps, as `draw_training_noise` drew them."""

    noise: torch.Tensor
    """The noise the target is made from (epsilon itself, or part of v)."""

    input_noise: torch.Tensor
    """The noise mixed into the UNet's input: `noise` plus the input perturbation, or `noise` itself (the very
    same tensor) without `ip_noise_gamma`."""

    timesteps: torch.Tensor
    """One integer timestep per image, int64."""

    timesteps_on_cpu: torch.Tensor
    """`timesteps` where they were drawn, to be read without waiting for the device."""


def draw_training_noise(
    latents: torch.Tensor, seeds: Sequence[int], objective: ObjectiveConfig, num_train_timesteps: int
) -> NoiseDraw:
    """Noise and a timestep for each image from its own seed (`fit.batches.noise_seed`): what one image gets
    does not depend on its batch mates, the process it landed on, or where a run resumed.

    Each image's generator draws, in this order: the Gaussian noise, the timestep, then what the objective turns
    on: the offset (`fit.noise.offset_noise`), the multi-resolution noise (`pyramid_noise`, normalising the
    offset noise too, as kohya applies the two), the input perturbation (`perturbed_input_noise`). The first two
    thus stay what they were without the extras, and with none of them the draw is SDXL's plain one.

    Everything is drawn on the CPU and then moved to the latents' device (without waiting for the copy): the
    numbers are the same on every kind of device, and counting the timesteps (`Run.draw_noise`) never waits for
    a GPU. The tensors returned are on the latents' device; `NoiseDraw.timesteps_on_cpu` keeps the CPU copy."""
    noises, input_noises, timesteps = [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape[1:], generator=generator, dtype=latents.dtype)
        timesteps.append(draw_timesteps(objective, num_train_timesteps, generator))
        if objective.noise_offset > 0:
            strength = uniform_strength(objective.noise_offset, objective.noise_offset_random_strength, generator)
            noise = offset_noise(noise, strength, generator)
        if objective.multires_noise_iterations > 0:
            noise = pyramid_noise(noise, objective.multires_noise_iterations, objective.multires_noise_discount, generator)
        noises.append(noise)
        if objective.ip_noise_gamma > 0:
            gamma = uniform_strength(objective.ip_noise_gamma, objective.ip_noise_gamma_random_strength, generator)
            input_noises.append(perturbed_input_noise(noise, gamma, generator))
    noise = _to_device(torch.stack(noises), latents.device)
    drawn_timesteps = torch.cat(timesteps)
    input_noise = _to_device(torch.stack(input_noises), latents.device) if input_noises else noise
    return NoiseDraw(noise, input_noise, _to_device(drawn_timesteps, latents.device), drawn_timesteps)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)  # from pinned memory the copy runs alongside the GPU


def seeded_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_training_noise` with SDXL's own objective: plain Gaussian noise and uniform timesteps."""
    draw = draw_training_noise(latents, seeds, ObjectiveConfig(), num_train_timesteps)
    return draw.noise, draw.timesteps


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon, Ho et al. 2020), or the velocity sqrt(abar_t) * noise
    - sqrt(1 - abar_t) * latents (v_prediction, Salimans & Ho 2022, arXiv:2202.00512, section 4)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")
