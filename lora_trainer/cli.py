"""The `lora-train` command line. Each command loads its input and calls one function.

Heavy libraries (torch, diffusers) are imported inside the commands, so `--help` and config errors
answer at once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lora_trainer.errors import ConfigError, UserError

app = typer.Typer(
    name="lora-train",
    help="Train SDXL LoRAs that load in ComfyUI, AUTOMATIC1111, Forge and diffusers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigPath = Annotated[
    Path, typer.Argument(metavar="CONFIG", help="YAML config file (see configs/ and docs/config.md).", show_default=False)
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one config field, e.g. --set network.rank=16 or --set datasets.0.repeats=5. Repeatable.",
        show_default=False,
    ),
]


@app.command()
def train(config: ConfigPath, overrides: Overrides = None) -> None:
    """Train a LoRA: cache latents (if not cached yet), train, and write <output.dir>/<output.name>.safetensors."""
    from lora_trainer.config import load_config

    settings = load_config(config, overrides)
    from lora_trainer.train import train as run_training

    path = run_training(settings)
    typer.echo(f"saved {path}")


@app.command("cache-latents")
def cache_latents(config: ConfigPath, overrides: Overrides = None) -> None:
    """Encode every training image with the VAE (and, when training will use them, the captions with the text
    encoders) ahead of training; `train` then reuses the cache."""
    from lora_trainer.config import load_config

    settings = load_config(config, overrides)
    from lora_trainer.precache import fill_caches

    for line in fill_caches(settings):
        typer.echo(line)


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="Base model: diffusers folder, hub id, or builtin:tiny-sdxl.", show_default=False)],
    prompt: Annotated[list[str], typer.Option(help="A prompt; repeat for several images.", show_default=False)],
    lora: Annotated[Path | None, typer.Option(help="LoRA .safetensors to apply (kohya format).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNG files.")] = Path("samples"),
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt for every image.")] = "",
    seed: Annotated[int, typer.Option(help="Seed; every prompt uses it, so files compare across LoRAs.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 30,
    cfg: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")] = 7.0,
    width: Annotated[int | None, typer.Option(min=64, help="Width in pixels; default: the model's native size.")] = None,
    height: Annotated[int | None, typer.Option(min=64, help="Height in pixels; default: the model's native size.")] = None,
    lora_scale: Annotated[float, typer.Option(help="Strength of the LoRA (1 = as trained).")] = 1.0,
    vae: Annotated[str | None, typer.Option(help="A separate VAE (folder or hub id).")] = None,
    prediction_type: Annotated[str, typer.Option(help="epsilon or v_prediction.")] = "epsilon",
) -> None:
    """Generate one PNG per prompt with a base model plus a LoRA."""
    from pydantic import ValidationError

    from lora_trainer.config import ModelConfig
    from lora_trainer.config_errors import format_validation_error

    for name, size in (("--width", width), ("--height", height)):
        if size is not None and size % 8:
            raise ConfigError(f"{name}: must be a multiple of 8, got {size}")
    if lora is not None and not lora.is_file():
        raise ConfigError(f"--lora: file not found: {lora}")
    try:
        model_config = ModelConfig(pretrained=model, vae=vae, prediction_type=prediction_type)
    except ValidationError as error:
        options = {"pretrained": "--model", "vae": "--vae", "prediction_type": "--prediction-type"}
        raise ConfigError(format_validation_error(error, ModelConfig, "sample", options)) from None

    from lora_trainer.sample import SampleSettings, sample_images

    settings = SampleSettings(prompt, negative_prompt, seed, steps, cfg, width, height)
    for path in sample_images(model_config, lora, settings, out, lora_scale):
        typer.echo(str(path))


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns expected failures into one-line messages and exit codes."""
    _quiet_libraries()
    try:
        app(args=argv, prog_name="lora-train", standalone_mode=False)
    except UserError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted; files already saved are complete, nothing half-written was left", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as error:  # usage errors: unknown command or option, bad option value
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            print(f"error: {error.format_message()}", file=sys.stderr)
        sys.exit(error.exit_code)


def _quiet_libraries() -> None:
    # Library chatter (deprecation notes, optional-backend probes) would bury our own messages.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    package_log = logging.getLogger("lora_trainer")
    if not any(isinstance(handler, _StderrHandler) for handler in package_log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so redirection (and test capture) is honoured."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass
