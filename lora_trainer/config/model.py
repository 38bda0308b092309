"""The `model` section: which SDXL base to train on, and how it predicts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from lora_trainer.config.section import Section

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("shapes-sdxl", "tiny-sdxl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelConfig(Section):
    pretrained: str
    """The SDXL base model: a local diffusers folder, a Hugging Face hub id
    (`stabilityai/stable-diffusion-xl-base-1.0`), or a builtin model with SDXL's layout that is not
    SDXL: `builtin:shapes-sdxl`, tiny and pretrained to draw coloured shapes at 64 px (the quickstart's
    base), or `builtin:tiny-sdxl`, tiny with random weights, built on first use (for tests)."""

    variant: str | None = None
    """Weight variant to download from the hub, e.g. `fp16` for the half-size SDXL files."""

    vae: str | None = None
    """A separate VAE (folder or hub id), e.g. `madebyollin/sdxl-vae-fp16-fix`; default: the model's own."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts: `epsilon` (SDXL base and most finetunes) or `v_prediction` (v-pred finetunes)."""

    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str) -> str:
        return check_model_reference(value)

    @field_validator("vae")
    @classmethod
    def _check_vae(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith(BUILTIN_PREFIX):
            raise ValueError(f"must be a folder or a hub id, got {value!r}")
        return check_model_reference(value)


def check_model_reference(value: str) -> str:
    """Accept a builtin name, an existing folder, or something shaped like a hub id; return it resolved."""
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            allowed = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
            raise ValueError(f"unknown builtin model {value!r}; builtin models: {allowed}")
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if _HUB_ID.match(value) and not value.startswith((".", "/", "~")):
        return value
    raise ValueError(f"not a folder, a hub id (owner/name) or a builtin model: {value!r}")
