"""The `model` section: which SDXL base to train on, where its parts come from, and how it predicts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from lora_trainer.config.section import Section

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("shapes-sdxl", "tiny-sdxl")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Python pickles: loading one can run any code its author put in it.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelConfig(Section):
    pretrained: str
    """The SDXL base model: a single-file checkpoint as model sites ship them (`.safetensors`: SDXL base,
    Pony, Illustrious, NoobAI, merges; loaded offline), a local diffusers folder, a Hugging Face hub id
    (`stabilityai/stable-diffusion-xl-base-1.0`), or a builtin model with SDXL's layout that is not
    SDXL: `builtin:shapes-sdxl`, tiny and pretrained to draw coloured shapes at 64 px (the quickstart's
    base), or `builtin:tiny-sdxl`, tiny with random weights, built on first use (for tests)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id; default: the main branch."""

    variant: str | None = None
    """Weight variant to download from the hub, e.g. `fp16` for the half-size SDXL files."""

    config: str | None = None
    """For a single-file checkpoint: a diffusers folder (or hub id) whose configs and tokenizers describe it.
    Default: SDXL base 1.0's, shipped with lora-train, which fit every SDXL base-shaped checkpoint; give one
    for unusual merges (other depths or widths)."""

    vae: str | None = None
    """A separate VAE: a `.safetensors` file, a folder or a hub id, e.g. `madebyollin/sdxl-vae-fp16-fix`;
    default: the model's own."""

    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the UNet predicts: `epsilon` (SDXL base and most finetunes) or `v_prediction` (v-pred finetunes
    such as NoobAI-XL V-Pred). Default: what the model says (a `v_pred` key or modelspec metadata in a
    file, the scheduler config of a folder), else `epsilon`. Setting it against what the file says is an error."""

    allow_pickle: bool = False
    """Allow a `.ckpt`/`.pt`/`.bin` pickle as `pretrained` or `vae`. Loading a pickle can run code hidden in
    it; even with this on it is read with `torch.load(weights_only=True)`. Better: convert it to `.safetensors`."""

    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str) -> str:
        return check_model_reference(value, files=True)

    @field_validator("vae")
    @classmethod
    def _check_vae(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith(BUILTIN_PREFIX):
            raise ValueError(f"must be a file, a folder or a hub id, got {value!r}")
        return check_model_reference(value, files=True)

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith(BUILTIN_PREFIX) or Path(value).expanduser().is_file():
            raise ValueError(f"must be a diffusers folder or a hub id, got {value!r}")
        return check_model_reference(value, files=False)

    @model_validator(mode="after")
    def _pickles_need_consent(self) -> ModelConfig:
        for field in ("pretrained", "vae"):
            value = getattr(self, field)
            if value and is_pickle_path(value) and not self.allow_pickle:
                raise ValueError(
                    f"{field}: {value} is a pickle, and loading a pickle can run code hidden in it; convert it to "
                    ".safetensors, or set model.allow_pickle: true to read it with torch.load(weights_only=True)"
                )
        if self.config is not None and not is_model_file(self.pretrained):
            raise ValueError("config: only a single-file checkpoint in model.pretrained needs model.config; remove it")
        return self


def is_model_file(reference: str) -> bool:
    """Whether a (checked) model reference names one weights file rather than a folder, hub id or builtin."""
    return Path(reference).suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES and Path(reference).is_file()


def is_pickle_path(reference: str) -> bool:
    return Path(reference).suffix.lower() in PICKLE_SUFFIXES


def check_model_reference(value: str, files: bool = True) -> str:
    """Accept a builtin name, an existing folder (or model file, with `files`), or a hub id; return it resolved.

    A value that looks like a path (it starts with `.`, `/` or `~`, ends in a model file suffix, has more than
    one `/`, or starts with a folder that exists here) but does not exist is refused here with the path, rather
    than sent to the hub as an id that then fails with an unrelated message.
    """
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            allowed = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
            raise ValueError(f"unknown builtin model {value!r}; builtin models: {allowed}")
        return value
    path = Path(value).expanduser()
    suffix = path.suffix.lower()
    model_suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    if path.is_dir():
        return str(path.resolve())
    if path.is_file():
        if files and suffix in model_suffixes:
            return str(path.resolve())
        expected = "a .safetensors checkpoint, a diffusers folder or a hub id" if files else "a diffusers folder or a hub id"
        raise ValueError(f"{value} is a {suffix or 'extension-less'} file; expected {expected}")
    if _looks_like_path(value, model_suffixes):
        raise ValueError(f"no such file or folder: {path.resolve()} (check the path; relative paths start where you run lora-train)")
    if _HUB_ID.match(value):
        return value
    raise ValueError(f"not a file, a folder, a hub id (owner/name) or a builtin model: {value!r}")


def _looks_like_path(value: str, model_suffixes: tuple[str, ...]) -> bool:
    if value.startswith((".", "/", "~", "\\")) or "\\" in value or value.count("/") > 1:
        return True
    if Path(value).suffix.lower() in model_suffixes:
        return True
    first = value.split("/", 1)[0]
    return "/" in value and Path(first).is_dir()
