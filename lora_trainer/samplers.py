"""Samplers for generating images: their names, their diffusers schedulers and their AUTOMATIC1111 labels."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SAMPLER_NAMES = ("euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim")

# A1111's own labels ("Euler a", "DPM++ 2M Karras", ...) already normalise to the canonical names;
# these are the other spellings found in prompt files and workflows.
_ALIASES = {
    # kohya sd-scripts' --ss names; its "dpmsolver++" is DPMSolverMultistepScheduler at the default order 2.
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "dpmsolver++": "dpm++_2m",
    # A1111's internal aliases.
    "k_euler_ancestral": "euler_a",
    "k_dpmpp_2m": "dpm++_2m",
    "k_dpmpp_2m_ka": "dpm++_2m_karras",
    # ComfyUI and k-diffusion spell "++" as "pp"; ComfyUI picks Karras as a separate scheduler.
    "euler_ancestral": "euler_a",
    "dpmpp_2m": "dpm++_2m",
    "dpmpp_2m_karras": "dpm++_2m_karras",
}

# Canonical name -> (A1111 "Sampler", A1111 "Schedule type"); None leaves the schedule to A1111's default.
# Since A1111 1.9 a bare "DPM++ 2M" defaults to Karras sigmas, so the plain one names its schedule.
_A1111_LABELS: dict[str, tuple[str, str | None]] = {
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "dpm++_2m": ("DPM++ 2M", "Uniform"),
    "dpm++_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", None),
}
_KARRAS_VARIANTS = {"dpm++_2m": "dpm++_2m_karras", "dpm++_2m_karras": "dpm++_2m_karras"}
_PLAIN_SCHEDULES = ("automatic", "uniform")


def canonical_sampler(name: str) -> str:
    """The canonical name for `name`, given in any case, with spaces, '-' or '_' between words."""
    key = re.sub(r"[\s_-]+", "_", name.strip().lower())
    if key in SAMPLER_NAMES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown sampler {name!r}; choose {_choices()}")


def a1111_label(name: str) -> tuple[str, str | None]:
    """The "Sampler" label and "Schedule type" that A1111 writes for this sampler."""
    return _A1111_LABELS[canonical_sampler(name)]


def sampler_from_a1111(label: str, schedule_type: str | None) -> str:
    """The canonical name for an A1111 "Sampler" label and "Schedule type"; the inverse of `a1111_label`.

    A label without a schedule type reads as the plain sampler, which is what A1111 before 1.9 meant by it
    (it wrote Karras into the label: "DPM++ 2M Karras").
    """
    sampler = canonical_sampler(label)
    schedule = (schedule_type or "Automatic").strip().lower()
    if schedule in _PLAIN_SCHEDULES:
        return sampler
    if schedule == "karras" and sampler in _KARRAS_VARIANTS:
        return _KARRAS_VARIANTS[sampler]
    raise ValueError(f"unknown sampler {label!r} with schedule type {schedule_type!r}; choose {_choices()}")


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


def _choices() -> str:
    return ", ".join(SAMPLER_NAMES[:-1]) + f" or {SAMPLER_NAMES[-1]}"
