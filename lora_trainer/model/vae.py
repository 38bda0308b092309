"""SDXL's latent units: a VAE posterior sample shifted and scaled to what the UNet was trained on, and back."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_trainer.errors import UserError


def scale_latents(vae: torch.nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """A VAE posterior sample in the units the UNet was trained on."""
    return (sample - _shift(vae)) * vae.config.scaling_factor


def unscale_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """UNet-unit latents as the VAE decoder takes them: the inverse of `scale_latents`."""
    return latents / vae.config.scaling_factor + _shift(vae)


def _shift(vae: torch.nn.Module) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def non_finite_latents(image: Path | str) -> UserError:
    """The error for an image the VAE encoded to NaN/inf: mostly a VAE run in fp16 that overflows."""
    return UserError(
        f"{image}: the VAE produced NaN/inf latents; set model.vae to an fp32-safe VAE "
        "(e.g. madebyollin/sdxl-vae-fp16-fix) or check the image"
    )
