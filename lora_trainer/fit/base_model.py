"""What a run's LoRA says about its base: the name, the prediction type the run used, and a file's hashes."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.config.model import is_model_file
from lora_trainer.export.metadata import BaseModel
from lora_trainer.model.identity import file_sha256, legacy_model_hash
from lora_trainer.model.parts import SDXLParts
from lora_trainer.model.sources import display_name


def describe_base(parts: SDXLParts, with_hashes: bool = True, show_progress: bool = True) -> BaseModel:
    """The base of a run on `parts`; a single file is hashed (once per file version: the digest is cached)."""
    config = parts.config
    legacy = sha256 = ""
    if with_hashes and is_model_file(config.pretrained):
        path = Path(config.pretrained)
        legacy, sha256 = legacy_model_hash(path), file_sha256(path, show_progress)
    return BaseModel(
        name=display_name(config.pretrained),
        prediction_type=parts.prediction_type,
        legacy_hash=legacy,
        sha256=sha256,
        vae_name=display_name(config.vae) if config.vae else "",
    )
