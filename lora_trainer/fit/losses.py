"""The denoising loss: a per-element loss, an optional mask, then per-sample weights.

    loss = mean over the batch of  w_i * reduce_i(elementwise(prediction, target)),  in fp32
    reduce_i = mean over the sample's elements, or sum(loss * mask) / sum(mask) with a mask
    w_i = the image's dataset loss_weight * its timestep weight (min-SNR-gamma or debiased; `fit.weighting`)

The order is kohya sd-scripts' (`train_network.py`'s `process_batch`: `conditional_loss`, `apply_masked_loss`,
mean over all but the batch axis, `loss_weights`, then the SNR weightings); with every objective setting at its
default it is SDXL's plain mean squared error.
"""

from __future__ import annotations

import torch

from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.fit.weighting import timestep_weights


def huber_delta(objective: ObjectiveConfig, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Huber's (and smooth L1's) delta for each timestep, after kohya's `get_huber_threshold_if_needed`
    (library/train_util.py), with c = huber_c, s = huber_scale, T = the schedule's length:

        constant:     c * s
        exponential:  c ** (t / T) * s          (kohya: exp(-alpha * t) * s, alpha = -ln(c) / T)
        snr:          ((1 - c) / (1 + sigma_t) ** 2 + c) * s,   sigma_t = sqrt((1 - abar_t) / abar_t)

    `snr` goes from about 1 at t = 0 (no noise) to c at pure noise (abar = 0, sigma infinite, reached exactly with
    zero-terminal SNR). Unlike kohya, whose `snr` branch leaves huber_scale out, s multiplies every schedule,
    as `objective.huber_scale` says; with the default s = 1 the two agree."""
    c, steps = objective.huber_c, timesteps.float()
    if objective.huber_schedule == "constant":
        delta = torch.full_like(steps, c)
    elif objective.huber_schedule == "exponential":
        delta = c ** (steps / alphas_cumprod.shape[0])
    elif objective.huber_schedule == "snr":
        alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].double()
        # 1 / (1 + sigma)^2 written as abar / (sqrt(abar) + sqrt(1 - abar))^2: no division by abar = 0.
        signal_share = alpha_bar.sqrt() / (alpha_bar.sqrt() + (1.0 - alpha_bar).sqrt())
        delta = ((1.0 - c) * signal_share**2 + c).float()
    else:
        raise ValueError(f"unknown huber schedule {objective.huber_schedule!r}")
    return delta * objective.huber_scale


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", delta: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-element loss in fp32, as kohya's `conditional_loss` (library/train_util.py), with x = prediction
    - target and delta one value per sample (`huber_delta`):

        l2:         x ** 2
        l1:         |x|
        huber:      2 * delta * (sqrt(x ** 2 + delta ** 2) - delta)   pseudo-Huber (Khrapov et al. 2024,
                    arXiv:2403.16728): about x ** 2 below delta, 2 * delta * |x| above
        smooth_l1:  2 * (sqrt(x ** 2 + delta ** 2) - delta)           kohya's own, about x ** 2 / delta below
                    delta and 2 * |x| above; not torch's smooth_l1_loss
    """
    error = prediction.float() - target.float()
    if loss_type == "l2":
        return error**2
    if loss_type == "l1":
        return error.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss type {loss_type!r}")
    if delta is None:
        raise ValueError(f"loss type {loss_type!r} needs a delta per sample")
    delta = delta.to(error.device, torch.float32).view(-1, *([1] * (error.ndim - 1)))
    # sqrt(x^2 + d^2) - d rewritten as x^2 / (sqrt(x^2 + d^2) + d): the same value without cancellation for small x.
    shrink = error**2 / (torch.sqrt(error**2 + delta**2) + delta)
    return 2 * delta * shrink if loss_type == "huber" else 2 * shrink


def per_sample_loss(elementwise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's loss: the mean of its elements, or with a mask (B, 1, h, w) in [0, 1] at the latent size,
    sum(loss * mask) / sum(mask) over the sample's elements, the mask broadcast over the latent channels.

    A mask of ones gives the plain mean, a mask of one half gives the mean over that half: the masked loss is the
    loss of the region trained, whatever its area. kohya's `apply_masked_loss` instead multiplies by the mask and
    takes the plain mean, so its loss (and step size) also shrinks with the mask's area. A sample whose mask is
    all zero trains nothing: its loss is 0, not 0 / 0."""
    reduce_dims = tuple(range(1, elementwise.ndim))
    if mask is None:
        return elementwise.mean(dim=reduce_dims)
    expected = (elementwise.shape[0], 1, *elementwise.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit the latents: expected {expected}")
    mask = mask.to(elementwise.device, torch.float32)
    masked_sum = (elementwise * mask).sum(dim=reduce_dims)
    area = mask.sum(dim=reduce_dims) * elementwise.shape[1]
    return torch.where(area > 0, masked_sum / torch.where(area > 0, area, 1.0), 0.0)


def denoising_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    objective: ObjectiveConfig,
    loss_weights: torch.Tensor | None = None,
    loss_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's loss under `objective` (see the module docstring); `loss_masks` counts only with
    `objective.masked_loss`, and the dataset's `loss_weights` always count."""
    delta = huber_delta(objective, alphas_cumprod, timesteps) if objective.uses_huber_delta else None
    elementwise = elementwise_loss(prediction, target, objective.loss_type, delta)
    per_sample = per_sample_loss(elementwise, loss_masks if objective.masked_loss else None)
    if loss_weights is not None:
        per_sample = per_sample * loss_weights.to(per_sample.device, torch.float32)
    weights = timestep_weights(objective, alphas_cumprod, timesteps, prediction_type)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
