"""Per-timestep loss weights from the signal-to-noise ratio: min-SNR-gamma and debiased estimation.

    SNR(t) = abar_t / (1 - abar_t)

Both weightings multiply each sample's loss (after its mean over the latent), as kohya sd-scripts'
`apply_snr_weight` and `apply_debiased_estimation` (library/custom_train_functions.py) do. With zero-terminal
SNR the last timestep has abar = 0, so SNR = 0 there: every weight below stays finite at SNR 0.
"""

from __future__ import annotations

import torch

from lora_trainer.config.objective import ObjectiveConfig

DEBIASED_SNR_CAP = 1000.0
"""Debiased estimation caps SNR here (kohya's clamp): t = 0 has SNR about 1175 on SDXL's schedule, and up to
infinity on others."""

DEBIASED_SNR_FLOOR = 1e-3
"""The epsilon form of debiased estimation, 1 / sqrt(SNR), floors SNR here, so SNR 0 (zero-terminal SNR) weighs
at most 1 / sqrt(1e-3), about 31.6, instead of infinity. It lies below SDXL's smallest SNR (about 0.0047, at
t = 999), so SDXL's own schedule is never floored; the config refuses zero_terminal_snr with epsilon anyway."""


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) for each timestep, in fp32 on the timesteps' device (Ho et al. 2020's
    abar; the ratio as in Kingma et al. 2021, "Variational Diffusion Models"). 0 where abar_t = 0 (zero-terminal
    SNR's last step); computed in fp64, since 1 - abar_t near t = 0 (abar about 0.9991) loses digits in fp32."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].double()
    return (alpha_bar / (1.0 - alpha_bar)).float()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556, eq. 12; kohya's `apply_snr_weight`):
    epsilon: min(SNR, gamma) / SNR, v_prediction: min(SNR, gamma) / (SNR + 1).

    The epsilon form is written gamma / max(SNR, gamma), the same number for every SNR > 0, and 1 at SNR 0 (its
    limit) instead of 0 / 0."""
    if prediction_type == "epsilon":
        return gamma / snr.clamp(min=gamma)
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def debiased_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (kohya's `apply_debiased_estimation`, after Yu et al. 2024, arXiv:2310.08442), SNR
    capped at `DEBIASED_SNR_CAP` (1000): epsilon: 1 / sqrt(SNR), v_prediction: 1 / (SNR + 1). The epsilon form
    also floors SNR at `DEBIASED_SNR_FLOOR`, where kohya would divide by zero."""
    capped = snr.clamp(max=DEBIASED_SNR_CAP)
    if prediction_type == "epsilon":
        return capped.clamp(min=DEBIASED_SNR_FLOOR).rsqrt()
    if prediction_type == "v_prediction":
        return 1.0 / (capped + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def timestep_weights(
    objective: ObjectiveConfig, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor | None:
    """Each sample's weight from its timestep under the objective's weighting, or None when it weighs none."""
    if objective.min_snr_gamma is not None:
        return min_snr_weights(snr(alphas_cumprod, timesteps), objective.min_snr_gamma, prediction_type)
    if objective.debiased_estimation:
        return debiased_weights(snr(alphas_cumprod, timesteps), prediction_type)
    return None
