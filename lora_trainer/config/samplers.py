"""Sampler names: the denoising method of an image (Euler, DPM++ 2M, ...) as users write it in configs,
on the command line and after `--ss`. `lora_trainer.sampling.schedulers` turns a name into the diffusers
scheduler that runs it."""

from __future__ import annotations

import re

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


def canonical_sampler(name: str) -> str:
    """The canonical name for `name`, given in any case, with spaces, '-' or '_' between words."""
    key = re.sub(r"[\s_-]+", "_", name.strip().lower())
    if key in SAMPLER_NAMES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown sampler {name!r}; choose {sampler_choices()}")


def sampler_choices() -> str:
    return ", ".join(SAMPLER_NAMES[:-1]) + f" or {SAMPLER_NAMES[-1]}"
