"""The `sample` and `validation` sections: what is drawn and measured between epochs to see when a LoRA is done."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from lora_trainer.config.data import captioned_folder
from lora_trainer.config.prompts import PromptSpec, gather_prompts, parse_prompt_line, read_prompts_file
from lora_trainer.config.samplers import canonical_sampler
from lora_trainer.config.section import Section
from lora_trainer.errors import ConfigError


class SampleConfig(Section):
    prompts: list[str] = []
    """Prompts to draw; each may end with kohya's inline options, e.g.
    `ohwx, portrait --n blurry --d 7 --w 832 --h 1216 --l 6 --s 30 --ss euler_a`. Sampling during training is
    off without prompts."""

    prompts_file: Path | None = None
    """A text file of prompts, one per line with the same inline options (`#` comments, blank lines skipped)."""

    every_n_epochs: int | None = Field(1, gt=0)
    """Draw the prompts after every this many epochs (and after the last)."""

    every_n_steps: int | None = Field(None, gt=0)
    """Also draw them every this many optimizer steps."""

    before_training: bool = True
    """Draw them once before the first step too: the base model's baseline, to compare epochs against."""

    sampler: str = "euler"
    """euler, euler_a, dpm++_2m, dpm++_2m_karras or ddim (A1111 names like `DPM++ 2M Karras` are accepted)."""

    steps: int = Field(25, gt=0)
    """Denoising steps per image."""

    guidance_scale: float = Field(7.0, ge=0)
    """Classifier-free guidance scale (A1111's "CFG scale")."""

    negative_prompt: str = ""
    """Negative prompt for prompts without `--n`."""

    seed: int = 0
    """Seed of each prompt without `--d`, the same at every epoch so images compare across epochs; image i of
    a prompt drawn several times uses seed + i."""

    width: int | None = Field(None, gt=0)
    """Image width in pixels, a multiple of 8; default: the training resolution (`lora-train sample` without a
    config: the model's native size)."""

    height: int | None = Field(None, gt=0)
    """Image height in pixels, a multiple of 8; default as for width."""

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, value: str) -> str:
        return canonical_sampler(value)

    @field_validator("width", "height")
    @classmethod
    def _check_size(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, value: list[str]) -> list[str]:
        for index, line in enumerate(value):
            try:
                parse_prompt_line(line, f"prompt {index + 1}")
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("prompts_file")
    @classmethod
    def _check_prompts_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        resolved = value.expanduser().resolve()
        try:
            read_prompts_file(resolved)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return resolved

    def prompt_specs(self, resolution: int | None) -> list[PromptSpec]:
        """Every prompt (config list, then file) with this section's defaults filled in; sizes not given fall
        back to `resolution` (None: leave them to the model's native size)."""
        defaults = PromptSpec(
            prompt="",
            negative_prompt=self.negative_prompt,
            width=self.width or resolution,
            height=self.height or resolution,
            seed=self.seed,
            guidance_scale=self.guidance_scale,
            steps=self.steps,
            sampler=self.sampler,
        )
        return gather_prompts(self.prompts, self.prompts_file, "sample.prompts: prompt", defaults)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts or self.prompts_file)


class ValidationConfig(Section):
    fraction: float = Field(0.0, ge=0, lt=1)
    """Hold out this fraction of the training images (chosen from the seed) to measure a validation loss."""

    path: Path | None = None
    """Or a separate folder of captioned images to measure it on."""

    every_n_epochs: int = Field(1, gt=0)
    """Measure after every this many epochs (and before training, and after the last epoch)."""

    timesteps: list[int] = [100, 300, 500, 700, 900]
    """The fixed timesteps the loss is measured at; with fixed noise, every measurement is comparable."""

    seed: int = 0
    """Seed of the fixed noise."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: Path | None) -> Path | None:
        return None if value is None else captioned_folder(value)

    @field_validator("timesteps")
    @classmethod
    def _check_timesteps(cls, value: list[int]) -> list[int]:
        if not value or not all(0 <= step < 1000 for step in value):
            raise ValueError(f"must be one or more integers in [0, 1000), got {value}")
        return value

    @model_validator(mode="after")
    def _check_one_source(self) -> ValidationConfig:
        if self.fraction and self.path is not None:
            raise ValueError("path: give either fraction or path, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or self.path is not None

