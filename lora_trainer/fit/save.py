"""What a run writes: the LoRA file with its metadata, the resolved config and the loss curve beside it, and at
the end the history and the report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lora_trainer.adapters.lora import read_lora_weights
from lora_trainer.config.load import dump_config
from lora_trainer.export.lora_file import SAVE_DTYPES, save_lora_file, to_kohya_tensors
from lora_trainer.export.metadata import Progress, lora_metadata
from lora_trainer.files import write_text_atomic
from lora_trainer.fit.run import Run
from lora_trainer.report.history import history_path
from lora_trainer.report.html import write_report
from lora_trainer.report.plots import write_loss_curve

log = logging.getLogger(__name__)


def save_lora(run: Run, name: str, epoch: int) -> Path:
    """Write `<output.dir>/<name>.safetensors`, the resolved config and the loss curve beside it (main process only)."""
    accelerator, config = run.accelerator, run.config
    path = config.output.dir / f"{name}.safetensors"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = {part: (model, read_lora_weights(model)) for part, model in _unwrapped(run).items()}
        tensors = to_kohya_tensors(weights, SAVE_DTYPES[config.output.save_dtype])
        progress = Progress(steps=run.step, epoch=epoch, started_at=run.started_at)
        save_lora_file(path, tensors, lora_metadata(config, run.data.items, run.data.folders, progress, run.base))
        run.history.epoch_record(epoch, run.step).lora_file = path.name
        write_text_atomic(config.output.dir / f"{config.output.name}.yaml", dump_config(config))
        write_loss_curve(config.output.dir / f"{config.output.name}-loss.png", run.history.train_losses, f"{config.output.name}: training loss")
        log.info("saved %s", path)
    return path


def finalize(run: Run) -> Path:
    """Save the final LoRA and write the run report beside it."""
    path = save_lora(run, run.config.output.name, run.epochs)
    if run.accelerator.is_main_process:
        run.history.save(history_path(run.config.output.dir, run.config.output.name))
        report = write_report(run.config.output.dir, run.config.output.name)
        log.info("report: %s", report)
    return path


def _unwrapped(run: Run) -> dict[str, torch.nn.Module]:
    return {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}
