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

    save_every_n_steps: int | None = Field(None, gt=0)
    """Also save `<name>-step<step, six digits>.safetensors` every this many optimizer steps (kohya's
    `--save_every_n_steps`)."""

    keep_saves: int | None = Field(None, gt=0)
    """Keep only the newest this many of the files above, each kind counted apart (kohya's `--save_last_n_epochs`
    and `--save_last_n_steps`); the final LoRA and the one of a stop are always kept. Unset: keep all."""

    save_state_every_n_steps: int | None = Field(None, gt=0)
    """Save the training state (adapters, optimizer, schedule, random generators, data position) every this many
    optimizer steps into `<dir>/states/<name>-step<step>/`, for `lora-train train CONFIG --resume latest`. A stop
    by Ctrl-C or SIGTERM always saves one."""

    save_state_every_n_epochs: int | None = Field(None, gt=0)
    """Save the training state at the end of every this many epochs (see `save_state_every_n_steps`). With either
    set, the end of the run saves one too, so a finished run can be continued with more epochs."""

    keep_states: int = Field(2, gt=0)
    """Keep the newest this many training states; older ones are removed once a newer one is complete."""

    state_save_failure: Literal["warn", "stop"] = "warn"
    """What a state save that fails (disk full, folder not writable) does: `warn` says so in one line and trains
    on, the previous states kept; `stop` ends the run."""

    log_every_n_steps: int = Field(10, gt=0)
    """How often the losses are read from the GPU: every step's loss is still logged (TensorBoard, the history and
    report, the progress bar), but only every this many steps, and before each save, sample or evaluation. Reading
    makes the CPU wait for the GPU, so reading every step (1) slows training; a non-finite loss still stops the run
    with the LoRA of the last good step, as no update is applied after one."""

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


    @property
    def saves_states(self) -> bool:
        return bool(self.save_state_every_n_steps or self.save_state_every_n_epochs)
