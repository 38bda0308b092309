"""Where a model reference points: a diffusers folder, a hub id, or a builtin model (built on first use)."""

from __future__ import annotations

from lora_trainer.config.model import BUILTIN_PREFIX


def model_location(reference: str) -> str:
    """A folder or hub id that `from_pretrained` understands; builds a builtin model on first use."""
    if reference.startswith(BUILTIN_PREFIX):
        from lora_trainer.model.builtin import builtin_model_path

        return str(builtin_model_path(reference[len(BUILTIN_PREFIX) :]))
    return reference
