"""The `network` section: the adapters, their size and which parts of SDXL they train."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from lora_trainer.config.section import Section


class NetworkConfig(Section):
    rank: int = Field(32, gt=0)
    """LoRA rank (kohya's `network_dim`): the width of each adapter."""

    alpha: float = Field(16.0, gt=0)
    """LoRA alpha (kohya's `network_alpha`): adapters are scaled by alpha / rank."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapter's input during training (PEFT's `lora_dropout`; kohya's `network_dropout` acts
    after the down projection instead)."""

    train_unet: bool = True
    """Train adapters on the UNet's attention blocks."""

    train_text_encoder_1: bool = True
    """Train adapters on text encoder 1 (CLIP ViT-L)."""

    train_text_encoder_2: bool = True
    """Train adapters on text encoder 2 (OpenCLIP ViT-bigG)."""

    text_encoder_learning_rate: float | None = Field(None, gt=0)
    """Learning rate of the text-encoder adapters; default: `training.learning_rate`."""

    init_weights: Path | None = None
    """Start the adapters from this LoRA file's weights (kohya's `--network_weights`) instead of from zero; the
    optimizer and schedule start fresh (this is not a resume). The file must have been trained with the same rank
    and alpha on the same modules: its UNet and text-encoder parts need the matching `train_*` settings on, and
    adapted modules the file lacks start fresh, with a warning. A `.safetensors` file only; pickles are never read."""

    @field_validator("init_weights")
    @classmethod
    def _check_init_weights(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        resolved = value.expanduser().resolve()
        if resolved.suffix.lower() != ".safetensors":
            raise ValueError(f"must be a .safetensors LoRA file (pickles such as .ckpt/.pt are never read), got {resolved}")
        if not resolved.is_file():
            raise ValueError(f"file not found: {resolved}")
        return resolved

    @model_validator(mode="after")
    def _check_some_part_trains(self) -> NetworkConfig:
        if not (self.train_unet or self.train_text_encoder_1 or self.train_text_encoder_2):
            raise ValueError(
                "train_unet: at least one of train_unet, train_text_encoder_1, train_text_encoder_2 must be true"
            )
        return self

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder_1 or self.train_text_encoder_2

