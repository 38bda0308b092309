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

from lora_trainer.errors import UserError

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
    model: Annotated[str | None, typer.Option(help="Base model: diffusers folder, hub id, or builtin:tiny-sdxl.", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(help="Take the model options (and LoRA) from this training config.", show_default=False)] = None,
    lora: Annotated[list[str] | None, typer.Option(help="A LoRA .safetensors, optionally with a weight: --lora my.safetensors:0.8. Repeatable.", show_default=False)] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt, optionally with kohya's inline options (--n --w --h --d --l --s --ss). Repeatable.", show_default=False)] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A file of prompts, one per line, with the same inline options.", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNG files.")] = Path("samples"),
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt for prompts without --n.")] = "",
    seed: Annotated[int, typer.Option(help="Seed of prompts without --d; image i of a prompt uses seed + i.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 30,
    cfg: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")] = 7.0,
    sampler: Annotated[str, typer.Option(help="euler, euler_a, dpm++_2m, dpm++_2m_karras or ddim.")] = "euler",
    width: Annotated[int | None, typer.Option(min=64, help="Width in pixels; default: the model's native size.")] = None,
    height: Annotated[int | None, typer.Option(min=64, help="Height in pixels; default: the model's native size.")] = None,
    images: Annotated[int, typer.Option(min=1, help="Images per prompt.")] = 1,
    compare: Annotated[bool, typer.Option(help="Also draw each image without the LoRAs, with the same seed, side by side.")] = False,
    vae: Annotated[str | None, typer.Option(help="A separate VAE (folder or hub id).")] = None,
    prediction_type: Annotated[str, typer.Option(help="epsilon or v_prediction.")] = "epsilon",
) -> None:
    """Draw images with a base model plus LoRAs; each PNG carries its parameters as A1111 writes them."""
    from lora_trainer.sample_cli import SampleOptions, run_sample

    options = SampleOptions(
        model=model, config=config, loras=lora or [], prompts=prompt or [], prompts_file=prompts_file, out=out,
        negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg, sampler=sampler, width=width,
        height=height, images=images, compare=compare, vae=vae, prediction_type=prediction_type,
    )
    for path in run_sample(options):
        typer.echo(str(path))


@app.command()
def report(
    output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT_DIR", help="The output folder of a training run.", show_default=False)],
    name: Annotated[str | None, typer.Option(help="The run's output.name, if the folder holds several runs.", show_default=False)] = None,
) -> None:
    """Write the run report (report.html with the loss curves and the sample grid) for a finished or running run."""
    from lora_trainer.history import find_run_name
    from lora_trainer.report import write_report

    typer.echo(str(write_report(output_dir, name or find_run_name(output_dir))))


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
