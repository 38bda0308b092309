"""The `output` section: where the LoRA files go, what they are called and how precise they are."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lora_trainer.config.section import Section


class OutputConfig(Section):
    dir: Path = Path("output")
    """Folder for the LoRA files, the resolved config and the TensorBoard logs."""

    name: str = "lora"
    """File name of the LoRA, without extension."""

    save_every_n_epochs: int | None = Field(None, gt=0)
    """Also save `<name>-<epoch, six digits>.safetensors` every this many epochs (`mylora-000002.safetensors`)."""

    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    """Precision of the saved LoRA weights; fp16 halves the file and is what UIs expect."""

    @field_validator("dir")
    @classmethod
    def _resolve_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.+-]+", value) or value.startswith("."):
            raise ValueError(f"must be a plain file name (letters, digits, _ . + -), got {value!r}")
        return value

