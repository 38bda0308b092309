"""A LoRA drawn on another base than it was trained on still loads, but may look different: say so, once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lora_trainer.config.model import ModelConfig, is_model_file
from lora_trainer.export.lora_file import LoraFile
from lora_trainer.model.identity import legacy_model_hash
from lora_trainer.model.sources import display_name

log = logging.getLogger(__name__)


def warn_about_other_bases(loras: Sequence[tuple[LoraFile, float, str]], model: ModelConfig) -> list[str]:
    """Warn for each LoRA whose metadata names a different base than `model`; return the warnings."""
    name = display_name(model.pretrained)
    # The short hash reads 64 KiB, so comparing costs nothing even for a 7 GB checkpoint.
    short_hash = legacy_model_hash(Path(model.pretrained)) if is_model_file(model.pretrained) else ""
    warnings = []
    for lora, _, source in loras:
        trained_name = lora.metadata.get("ss_sd_model_name", "")
        trained_hash = lora.metadata.get("ss_sd_model_hash", "")
        if trained_hash and short_hash:
            different = trained_hash != short_hash
        else:
            # Older files (and kohya's, for hub ids) name the base by its whole path: compare the last part.
            different = bool(trained_name) and Path(trained_name).name != Path(name).name
        if different:
            trained = f"{trained_name} [{trained_hash}]" if trained_hash else trained_name
            current = f"{name} [{short_hash}]" if short_hash else name
            warnings.append(f"{source}: trained on {trained}, drawn here on {current}; it may look different")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
