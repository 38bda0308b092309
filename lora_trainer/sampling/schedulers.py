"""A sampler name as a diffusers scheduler over the model's own betas, and the label AUTOMATIC1111 gives it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_trainer.config.samplers import canonical_sampler

# Canonical name -> (A1111 "Sampler", A1111 "Schedule type"); None leaves the schedule to A1111's default.
# Since A1111 1.9 a bare "DPM++ 2M" defaults to Karras sigmas, so the plain one names its schedule.
_A1111_LABELS: dict[str, tuple[str, str | None]] = {
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "dpm++_2m": ("DPM++ 2M", "Uniform"),
    "dpm++_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", None),
}


ZERO_TERMINAL_SNR_GUIDANCE_RESCALE = 0.7
"""The guidance rescale phi that Lin et al. 2023 (arXiv:2305.08891, section 3.4) find best with zero terminal SNR."""


def zero_terminal_snr_sampling(scheduler: Any) -> Any:
    """The scheduler the samplers are made from (`make_scheduler` copies its config) for a model or LoRA trained
    with zero terminal SNR: rescaled betas, and trailing timestep spacing, so sampling starts at the last timestep
    where the model learnt pure noise (Lin et al. 2023, arXiv:2305.08891, sections 3.1 and 3.3)."""
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def a1111_label(name: str) -> tuple[str, str | None]:
    """The "Sampler" label and "Schedule type" that A1111 writes for this sampler."""
    return _A1111_LABELS[canonical_sampler(name)]


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], prediction_type: str):
    """A diffusers scheduler for sampler `name`, with the model's betas and timesteps from `scheduler_config`."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    sampler = canonical_sampler(name)
    if sampler == "euler":
        # Set explicitly: a config saved from a Karras scheduler would otherwise carry its sigmas over.
        return EulerDiscreteScheduler.from_config(scheduler_config, prediction_type=prediction_type, use_karras_sigmas=False)
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(scheduler_config, prediction_type=prediction_type)
    if sampler in ("dpm++_2m", "dpm++_2m_karras"):
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config,
            prediction_type=prediction_type,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=sampler == "dpm++_2m_karras",
        )
    # DDIM's own default clips the predicted sample to [-1, 1], which suits pixels and ruins latents;
    # SDXL's config turns it off, and a config that does not mention it must not turn it on.
    clip_sample = bool(scheduler_config.get("clip_sample", False))
    return DDIMScheduler.from_config(scheduler_config, prediction_type=prediction_type, clip_sample=clip_sample)
