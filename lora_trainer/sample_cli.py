"""`lora-train sample`'s options checked and turned into prompts and LoRA choices, before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from lora_trainer.config import ModelConfig
from lora_trainer.config_errors import format_validation_error
from lora_trainer.errors import ConfigError
from lora_trainer.prompts import PromptSpec, gather_prompts
from lora_trainer.sample import LoraChoice, sample_images
from lora_trainer.samplers import canonical_sampler

_MODEL_OPTIONS = {"pretrained": "--model", "vae": "--vae", "prediction_type": "--prediction-type"}


@dataclass(frozen=True)
class SampleOptions:
    model: str | None
    config: Path | None
    loras: list[str]
    prompts: list[str]
    prompts_file: Path | None
    out: Path
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    width: int | None
    height: int | None
    images: int
    compare: bool
    vae: str | None
    prediction_type: str


def run_sample(options: SampleOptions) -> list[Path]:
    model = model_options(options)
    loras = [lora_choice(text) for text in options.loras]
    specs = prompt_specs(options)
    return sample_images(model, loras, specs, options.out, options.images, options.compare)


def model_options(options: SampleOptions) -> ModelConfig:
    """The base model from --model (and --vae, --prediction-type), or the model section of --config."""
    if options.config is not None:
        if options.model is not None:
            raise ConfigError("--model: give either --model or --config, not both")
        from lora_trainer.config import load_config

        return load_config(options.config).model
    if options.model is None:
        raise ConfigError("--model: required (a diffusers folder, hub id or builtin:tiny-sdxl), or give --config")
    try:
        return ModelConfig(pretrained=options.model, vae=options.vae, prediction_type=options.prediction_type)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, ModelConfig, "sample", _MODEL_OPTIONS)) from None


def lora_choice(text: str) -> LoraChoice:
    """`file.safetensors` or `file.safetensors:0.8`."""
    path_text, weight = text, 1.0
    head, separator, tail = text.rpartition(":")
    if separator:
        try:
            path_text, weight = head, float(tail)
        except ValueError:
            pass  # a colon inside the path, not a weight
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--lora: file not found: {path}")
    return LoraChoice(path, weight)


def prompt_specs(options: SampleOptions) -> list[PromptSpec]:
    for name, size in (("--width", options.width), ("--height", options.height)):
        if size is not None and size % 8:
            raise ConfigError(f"{name}: must be a multiple of 8, got {size}")
    try:
        sampler = canonical_sampler(options.sampler)
    except ValueError as error:
        raise ConfigError(f"--sampler: {error}") from None
    if not options.prompts and options.prompts_file is None:
        raise ConfigError("--prompt: give at least one --prompt or a --prompts-file")
    defaults = PromptSpec(
        prompt="",
        negative_prompt=options.negative_prompt,
        width=options.width,
        height=options.height,
        seed=options.seed,
        guidance_scale=options.cfg,
        steps=options.steps,
        sampler=sampler,
    )
    return gather_prompts(options.prompts, options.prompts_file, "--prompt", defaults)
