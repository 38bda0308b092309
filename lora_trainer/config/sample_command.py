"""`lora-train sample`: what it draws, from options declared once.

Every option is a field of a config section: the drawing options are the `sample` section's
(`SampleConfig`), the model options the `model` section's (`ModelConfig`), `--max-token-length` the `data`
section's (`DataConfig`), and the rest belong to the command (`SampleCommand`). `cli.py` builds the command
line from `SAMPLE_OPTIONS`, so an option takes the same values, has the same help and gives the same errors
as the field it sets, and with `--config` it overrides what that config says.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from lora_trainer.config.data import DataConfig
from lora_trainer.config.evaluation import SampleConfig
from lora_trainer.config.load import load_config
from lora_trainer.config.messages import format_config_errors
from lora_trainer.config.model import BUILTIN_MODELS, BUILTIN_PREFIX, ModelConfig
from lora_trainer.config.prompts import PromptSpec
from lora_trainer.config.schema import Config
from lora_trainer.config.section import Section
from lora_trainer.errors import ConfigError


class SampleCommand(Section):
    config: Path | None = None
    """A training config: draw with its model, its sample section and, without --lora, the LoRA it trains
    (<output.dir>/<output.name>.safetensors); the other options override what it says."""

    loras: list[str] = []
    """A LoRA .safetensors, optionally with a weight: --lora my.safetensors:0.8; several LoRAs stack."""

    images: int = Field(1, gt=0)
    """Images per prompt."""

    compare: bool = False
    """Also draw each image without the LoRAs, with the same seed, and put the two side by side."""

    out: Path = Path("samples")
    """Folder for the PNG files."""

    @field_validator("loras")
    @classmethod
    def _check_loras(cls, value: list[str]) -> list[str]:
        for text in value:
            _split_lora(text)
        return value


@dataclass(frozen=True)
class SampleOption:
    """One command-line option and the config field it sets."""

    flag: str
    section: type[Section]
    field: str
    metavar: str | None  # None: a flag without a value

    @property
    def parameter(self) -> str:
        return parameter_name(self.flag)

    @property
    def repeatable(self) -> bool:
        return self.section.model_fields[self.field].annotation == list[str]


SAMPLE_OPTIONS = (
    SampleOption("--config", SampleCommand, "config", "CONFIG"),
    SampleOption("--model", ModelConfig, "pretrained", "MODEL"),
    SampleOption("--model-config", ModelConfig, "config", "FOLDER"),
    SampleOption("--vae", ModelConfig, "vae", "VAE"),
    SampleOption("--prediction-type", ModelConfig, "prediction_type", "TYPE"),
    SampleOption("--allow-pickle", ModelConfig, "allow_pickle", None),
    SampleOption("--lora", SampleCommand, "loras", "FILE[:WEIGHT]"),
    SampleOption("--prompt", SampleConfig, "prompts", "PROMPT"),
    SampleOption("--prompts-file", SampleConfig, "prompts_file", "FILE"),
    SampleOption("--negative-prompt", SampleConfig, "negative_prompt", "TEXT"),
    SampleOption("--seed", SampleConfig, "seed", "N"),
    SampleOption("--steps", SampleConfig, "steps", "N"),
    SampleOption("--guidance-scale", SampleConfig, "guidance_scale", "SCALE"),
    SampleOption("--sampler", SampleConfig, "sampler", "NAME"),
    SampleOption("--width", SampleConfig, "width", "PIXELS"),
    SampleOption("--height", SampleConfig, "height", "PIXELS"),
    SampleOption("--max-token-length", DataConfig, "max_token_length", "N"),
    SampleOption("--images", SampleCommand, "images", "N"),
    SampleOption("--compare", SampleCommand, "compare", None),
    SampleOption("--out", SampleCommand, "out", "FOLDER"),
)
# Options that were renamed, and their new name; given, they are an error that says so.
RENAMED_OPTIONS = {"--cfg": "--guidance-scale"}
_PROMPT_SOURCES = ("prompts", "prompts_file")


@dataclass(frozen=True)
class LoraChoice:
    path: Path
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class SampleRequest:
    model: ModelConfig
    specs: list[PromptSpec]  # sizes may be None: the model's native size
    loras: list[LoraChoice]
    images_per_prompt: int
    compare: bool
    out: Path
    max_token_length: int = 75  # prompt tokens encoded, as the LoRA's training encoded its captions


def sample_request(given: dict[str, Any]) -> SampleRequest:
    """What to draw, from the options given (`parameter -> value`, None or [] for options not given)."""
    for old, new in RENAMED_OPTIONS.items():
        if given.get(parameter_name(old)) is not None:
            raise ConfigError(f"{old}: renamed to {new}; give {new} instead")
    command = _section(SampleCommand, {}, given)
    base = load_config(command.config) if command.config is not None else None
    model = _model(base, given)
    sample = _section(SampleConfig, _sample_defaults(base, given), given)
    data = _section(DataConfig, base.data.model_dump() if base is not None else {}, given)
    specs = sample.prompt_specs(base.data.resolution if base is not None else None)
    if not specs:
        raise ConfigError("--prompt: give at least one --prompt or a --prompts-file")
    loras = [lora_choice(text) for text in command.loras]
    if not loras and base is not None:
        loras = [trained_lora(base, command.config)]
    check_out_folder(command.out)
    return SampleRequest(model, specs, loras, command.images, command.compare, command.out, data.max_token_length)


def parameter_name(flag: str) -> str:
    """The Python name an option's value arrives under: `--prompts-file` -> `prompts_file`."""
    return flag.removeprefix("--").replace("-", "_")


def lora_choice(text: str) -> LoraChoice:
    """`file.safetensors` or `file.safetensors:0.8`."""
    try:
        path_text, weight = _split_lora(text)
    except ValueError as error:
        raise ConfigError(f"--lora: {error}") from None
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--lora: file not found: {path}")
    return LoraChoice(path, weight)


def _split_lora(text: str) -> tuple[str, float]:
    """The file and the weight of `file.safetensors[:WEIGHT]`; a weight that is not finite is a ValueError."""
    head, separator, tail = text.rpartition(":")
    if not separator:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return text, 1.0  # a colon inside the path, not a weight
    if not math.isfinite(weight):
        raise ValueError(f"the weight of {head} must be a finite number, like 0.8, got {tail}")
    return head, weight


def check_out_folder(out: Path) -> None:
    """Refuse an `--out` the images cannot be written into, before any model loads: a file, a path under a
    file, or a folder (or, for one not made yet, the nearest existing folder above it) that is not writable."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.exists():  # nothing above it exists, not even the root: nothing to check here
        return
    if not existing.is_dir():
        where = f"{out} is a file" if existing == out else f"{out} is under {existing}, which is a file"
        raise ConfigError(f"--out: {where}, not a folder; give a folder for the images")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = f"{out} is" if existing == out else f"{out} would be made in {existing}, which is"
        raise ConfigError(f"--out: {where} not writable; give a folder you can write to")


def trained_lora(config: Config, source: Path) -> LoraChoice:
    """The final LoRA file a training config writes."""
    path = config.output.dir / f"{config.output.name}.safetensors"
    if not path.is_file():
        raise ConfigError(f"--config: {source} trains {path}, which is not there yet; train it first or give --lora")
    return LoraChoice(path)


def _model(base: Config | None, given: dict[str, Any]) -> ModelConfig:
    if base is not None and given.get("model") is not None:
        raise ConfigError("--model: give either --model or --config, not both")
    if base is None and given.get("model") is None:
        builtins = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_MODELS)
        raise ConfigError(f"--model: required (a .safetensors checkpoint, a diffusers folder, a hub id or one of {builtins}), or give --config")
    defaults = base.model.model_dump() if base is not None else {}
    return _section(ModelConfig, defaults, given)


def _sample_defaults(base: Config | None, given: dict[str, Any]) -> dict[str, Any]:
    if base is None:
        return {}
    defaults = base.sample.model_dump()
    prompt_options = {option.parameter for option in SAMPLE_OPTIONS if option.field in _PROMPT_SOURCES}
    if prompt_options & _given(given):
        for field in _PROMPT_SOURCES:  # prompts on the command line replace the config's, file and list alike
            defaults.pop(field)
    return defaults


def _section(section: type[Section], defaults: dict[str, Any], given: dict[str, Any]) -> Any:
    """`section` from `defaults` with the options given for its fields on top; errors name the options."""
    options = [option for option in SAMPLE_OPTIONS if option.section is section]
    values = {**defaults, **{option.field: given[option.parameter] for option in options if option.parameter in _given(given)}}
    try:
        return section.model_validate(values)
    except ValidationError as error:
        flags = {option.field: option.flag for option in options}
        raise ConfigError(format_config_errors(error, section, None, flags)) from None


def _given(given: dict[str, Any]) -> set[str]:
    # An unset flag arrives as False: it must not switch off what the --config file turned on.
    return {name for name, value in given.items() if value is not None and value != [] and value is not False}
