"""SDXL's latent units: a VAE posterior sample shifted and scaled to what the UNet was trained on, and back."""

from __future__ import annotations

import torch


def scale_latents(vae: torch.nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """A VAE posterior sample in the units the UNet was trained on."""
    return (sample - _shift(vae)) * vae.config.scaling_factor


def unscale_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """UNet-unit latents as the VAE decoder takes them: the inverse of `scale_latents`."""
    return latents / vae.config.scaling_factor + _shift(vae)


def _shift(vae: torch.nn.Module) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0
