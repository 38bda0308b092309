"""Where a model reference points: a single-file checkpoint, a diffusers folder, a hub id, or a builtin model."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.config.model import BUILTIN_PREFIX

# SDXL base 1.0's configs and both CLIP tokenizers, without weights: what a single-file SDXL checkpoint
# holds no description of, shipped so such a file loads with nothing but itself.
SDXL_BASE_CONFIG = Path(__file__).resolve().parent / "pretrained" / "sdxl-base"


def model_location(reference: str) -> str:
    """A folder or hub id that `from_pretrained` understands; builds a builtin model on first use."""
    if reference.startswith(BUILTIN_PREFIX):
        from lora_trainer.model.builtin import builtin_model_path

        return str(builtin_model_path(reference[len(BUILTIN_PREFIX) :]))
    return reference


def is_hub_id(reference: str) -> bool:
    return not reference.startswith(BUILTIN_PREFIX) and not Path(reference).expanduser().exists()


def display_name(reference: str) -> str:
    """The name a LoRA's metadata gives its base: the file or folder's own name (not the user's whole path),
    a hub id or a builtin name as written."""
    if reference.startswith(BUILTIN_PREFIX) or is_hub_id(reference):
        return reference
    return Path(reference).name
