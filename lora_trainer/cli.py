"""The `lora-train` command line. Each command loads its input and calls one function.

Heavy libraries (torch, diffusers) are imported inside the commands, so `--help` and config errors
answer at once.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from lora_trainer.config.sample_command import RENAMED_OPTIONS, SAMPLE_OPTIONS, SampleOption, parameter_name
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.fit.stopping import Interrupted


class UsageError(ConfigError):
    """Options that contradict each other."""


class Stopped(Exception):
    """A run that stopped on request with everything saved: not an error, but not a finished run either."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Command(TyperCommand):
    """Help as the README writes commands: `train [OPTIONS] CONFIG`, with no type placeholders."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [self.options_metavar, *(param.metavar for param in self.get_params(ctx) if param.param_type_name == "argument")]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        params = self.get_params(ctx)
        arguments = [(param.metavar, param.help or "") for param in params if param.param_type_name == "argument"]
        options = [param.get_help_record(ctx) for param in params if param.param_type_name == "option"]
        for title, records in (("Arguments", arguments), ("Options", [record for record in options if record])):
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


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
        metavar="KEY=VALUE",
        help="Override one config field, e.g. --set network.rank=16 or --set datasets.0.repeats=5. Repeatable.",
        show_default=False,
    ),
]


Resume = Annotated[
    str | None,
    typer.Option(
        "--resume", metavar="latest|STATE",
        help="Continue a stopped run from its newest saved state (latest) or from a state folder under <output.dir>/states.",
        show_default=False,
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the files of an earlier run of the same output.name in output.dir.")
]


@app.command(cls=_Command)
def train(config: ConfigPath, overrides: Overrides = None, resume: Resume = None, overwrite: Overwrite = False) -> None:
    """Train a LoRA: cache latents (if not cached yet), train, and write <output.dir>/<output.name>.safetensors.
    Ctrl-C or SIGTERM finishes the step, saves the state and a LoRA, and says how to resume."""
    from lora_trainer.config.load import load_config

    settings = load_config(config, overrides)
    if resume is not None and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; give one of them")
    check_output_locations(settings)
    check_masks(settings, config)
    from lora_trainer.fit.stopping import TrainingStopped
    from lora_trainer.fit.train import train as run_training

    try:
        path = run_training(settings, resume, overwrite)
    except TrainingStopped as stopped:
        again = " ".join(["lora-train train", str(config), *(f"--set {item}" for item in overrides or []), "--resume latest"])
        raise Stopped(f"{stopped}; continue with: {again}", stopped.exit_code) from None
    from lora_trainer.fit.accelerator import is_first_process

    if is_first_process():  # with several processes, only the first writes the file
        typer.echo(f"saved {path}")


def check_output_locations(settings: Any) -> None:
    """Fail now, not after the models load, when the run could not write its files."""
    from lora_trainer.config.locations import check_writable

    check_writable(settings.output.dir, "output.dir")
    check_cache_location(settings)


def check_masks(settings: Any, config: Path) -> None:
    """Each image has its mask (`datasets.N.mask_dir`), checked before the models load."""
    from lora_trainer.data.masks import check_mask_folders

    check_mask_folders(settings.datasets, str(config))


def check_cache_location(settings: Any) -> None:
    from lora_trainer.config.locations import check_writable

    check_writable(settings.cache_dir, "data.cache_dir" if settings.data.cache_dir else "output.dir (its latent_cache folder)")


@app.command("cache-latents", cls=_Command)
def cache_latents(config: ConfigPath, overrides: Overrides = None) -> None:
    """Encode every training and validation image with the VAE (and, when training will use them, the captions
    with the text encoders) ahead of training; `train` then reuses the cache."""
    from lora_trainer.config.load import load_config

    settings = load_config(config, overrides)
    check_cache_location(settings)
    check_masks(settings, config)
    from lora_trainer.cache.fill import precache

    for line in precache(settings):
        typer.echo(line)


GpuMemory = Annotated[
    float | None,
    typer.Option(
        "--gpu-memory", metavar="GIB", min=0.1,
        help="The GPU's memory in GiB: warn, naming what to change, when the estimated peak is over it (the exit code stays 0).",
        show_default=False,
    ),
]
Processes = Annotated[
    int, typer.Option("--processes", metavar="N", min=1, help="Plan for N processes (GPUs), as accelerate launch would run it.")
]


@app.command(cls=_Command)
def plan(config: ConfigPath, overrides: Overrides = None, gpu_memory: GpuMemory = None, processes: Processes = 1) -> None:
    """Show what `train` would do, before any model weight loads: every image's bucket (kept, upscaled or dropped and
    why), batches and steps, the learning rates, the files it writes, and an estimate of its peak GPU memory.
    It is a plan: it exits 0 whatever the estimate; only a bad config or dataset is an error."""
    from lora_trainer.config.load import load_config

    settings = load_config(config, overrides)
    check_output_locations(settings)
    check_masks(settings, config)
    from lora_trainer.fit.plan_command import plan_blocks

    for index, block in enumerate(plan_blocks(settings, gpu_memory, processes)):
        typer.echo(("\n" if index else "") + block)


def sample(**given: Any) -> None:
    """Draw images with a base model plus LoRAs; each PNG carries its parameters as A1111 writes them."""
    from lora_trainer.config.sample_command import sample_request

    request = sample_request(given)
    from lora_trainer.sampling.generate import sample_images

    for path in sample_images(request):
        typer.echo(str(path))


def _sample_parameters() -> list[inspect.Parameter]:
    """`sample`'s options, one per config field it sets, with that field's docstring as the help."""
    parameters = [_sample_parameter(option) for option in SAMPLE_OPTIONS]
    for old, new in RENAMED_OPTIONS.items():
        hidden = typer.Option(old, hidden=True, help=f"Renamed to {new}.")
        parameters.append(inspect.Parameter(parameter_name(old), inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, hidden]))
    return parameters


def _sample_parameter(option: SampleOption) -> inspect.Parameter:
    field = option.section.model_fields[option.field]
    help_text = " ".join((field.description or "").replace("`", "").split())
    if option.metavar is None:  # a flag, off unless given
        annotation: Any = Annotated[bool, typer.Option(option.flag, help=help_text)]
        return inspect.Parameter(option.parameter, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=annotation)
    if option.repeatable:
        help_text += " Repeatable."
    elif field.default not in (None, "") and not field.is_required():
        help_text += f"  [default: {field.default}]"
    # Every value arrives as text and is checked by the field itself, so the option and the config field
    # accept the same values and give the same errors.
    kind = list[str] | None if option.repeatable else str | None
    annotation = Annotated[kind, typer.Option(option.flag, metavar=option.metavar, help=help_text, show_default=False)]
    return inspect.Parameter(option.parameter, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


sample.__signature__ = inspect.Signature(_sample_parameters())  # type: ignore[attr-defined]
app.command(cls=_Command)(sample)


@app.command(cls=_Command)
def report(
    output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT_DIR", help="The output folder of a training run.", show_default=False)],
    name: Annotated[str | None, typer.Option(metavar="NAME", help="The run's output.name, if the folder holds several runs.", show_default=False)] = None,
) -> None:
    """Write the run report (report.html with the loss curves and the sample grid) for a finished or running run."""
    from lora_trainer.report.history import find_run_name
    from lora_trainer.report.html import write_report

    typer.echo(str(write_report(output_dir, name or find_run_name(output_dir))))


@app.command(cls=_Command)
def resize(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A LoRA, LoCon or DyLoRA .safetensors file.", show_default=False)],
    rank: Annotated[int, typer.Option("--rank", metavar="N", help="The rank to cut to, below the file's.", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("--output", metavar="OUT", help="Where to write; default <stem>-rank<N>.safetensors beside FILE.", show_default=False)
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Cut a LoRA or LoCon (by SVD, the closest rank-N update) or a DyLoRA (its first N ranks) to rank N;
    modules already at rank N or below are copied unchanged."""
    from lora_trainer.export.resize import resize_lora_file

    typer.echo(resize_lora_file(file, rank, output, overwrite).summary())


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns expected failures into one-line messages and exit codes."""
    _quiet_libraries()
    try:
        code = app(args=argv, prog_name="lora-train", standalone_mode=False)
    except Stopped as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(stopped.exit_code)
    except UserError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt, Interrupted) as interrupt:
        _say_interrupted()
        sys.exit(getattr(interrupt, "exit_code", 130))
    except typer.TyperException as error:  # usage errors: unknown command or option, bad option value
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            print(f"error: {error.format_message()}", file=sys.stderr)
        sys.exit(error.exit_code)
    # Outside standalone mode Typer hands back the exit code instead of exiting (130 for a Ctrl-C it caught).
    if isinstance(code, int) and code:
        if code == 130:
            _say_interrupted()
        sys.exit(code)


def _say_interrupted() -> None:
    print("\ninterrupted; files already saved are complete, nothing half-written was left", file=sys.stderr)


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
