"""The extras on one image's training noise, each drawn from that image's own generator.

Every function takes a single image's noise, shaped (C, H, W), and the generator seeded for that image
(`fit.batches.noise_seed`), so what an image gets depends on its seed alone: not on its batch mates, the
process it landed on, or where a run resumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def uniform_strength(strength: float, randomised: bool, generator: torch.Generator) -> float:
    """`strength`, or `strength` times a uniform draw in [0, 1) when `randomised` (kohya's
    `noise_offset_random_strength` and `ip_noise_gamma_random_strength` draw `torch.rand(1)` so; once per image
    here, once per batch there)."""
    if not randomised:
        return strength
    return strength * torch.rand(1, generator=generator, device=generator.device).item()


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """`noise + offset * randn(C, 1, 1)`: one constant shift per channel, so the model can learn to change an
    image's mean brightness (Guttenberg 2023, "Diffusion with Offset Noise"; kohya's `apply_noise_offset`)."""
    shift = torch.randn((noise.shape[0], 1, 1), generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training"), as kohya's
    `pyramid_noise_like` defines it: for i = 0 .. iterations - 1, with r uniform in [2, 4) drawn anew each time,
    white noise of size (max(1, int(H / r^i)), max(1, int(W / r^i))) is upsampled bilinearly to (H, W), weighed by
    `discount^i` and added, stopping after a level with a side of 1; the sum is divided by its standard deviation.
    (Level 0 is full-size noise: r^0 = 1.) The standard deviation is this image's, where kohya takes the batch's."""
    channels, height, width = noise.shape
    total = noise
    for level in range(iterations):
        ratio = 2 + 2 * torch.rand(1, generator=generator, device=generator.device).item()
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = torch.randn((1, channels, *size), generator=generator, device=noise.device, dtype=noise.dtype)
        total = total + discount**level * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        if min(size) == 1:
            break
    return total / total.std()


def perturbed_input_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """`noise + gamma * randn`: input perturbation (Ning et al. 2023, arXiv:2301.11706; kohya's
    `ip_noise_gamma`). Only the UNet's input gets it; the target stays `noise`, which reduces exposure bias."""
    extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * extra
