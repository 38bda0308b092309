"""`lora-train train`: setup -> fit -> finalize, with the failures a user can act on turned into one line."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_trainer.config.schema import Config
from lora_trainer.errors import UserError
from lora_trainer.fit.accelerator import is_first_process
from lora_trainer.fit.loop import NonFiniteLoss, fit
from lora_trainer.fit.output_folder import claim_output_folder, release_folders
from lora_trainer.fit.run import Run
from lora_trainer.fit.save import finalize, save_lora
from lora_trainer.fit.setup import setup
from lora_trainer.fit.stopping import StopSignals
from lora_trainer.report.history import history_path


def train(config: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train a LoRA as configured (continuing the state `resume` names); return the path of the final `.safetensors`.

    The first Ctrl-C or SIGTERM during training saves and raises TrainingStopped; any other stops at once.
    """
    with StopSignals().installed() as stop:
        try:
            if is_first_process():
                claim_output_folder(config.output, config.cache_dir, resume is not None, overwrite)
            return _train(config, resume, stop)
        finally:
            release_folders()


def _train(config: Config, resume: str | None, stop: StopSignals) -> Path:
    run = setup(config, resume)
    try:
        try:
            fit(run, stop)
        except NonFiniteLoss as bad_loss:
            raise UserError(_non_finite_message(run, bad_loss)) from None
        except torch.cuda.OutOfMemoryError:
            raise UserError(
                f"out of GPU memory at step {run.step + 1}: set training.gradient_checkpointing: true, "
                "training.optimizer: adamw8bit, a smaller training.batch_size (with gradient_accumulation_steps), "
                "or freeze the text encoders"
            ) from None
        return finalize(run)
    finally:
        run.accelerator.end_training()


def _non_finite_message(run: Run, stop: NonFiniteLoss) -> str:
    advice = "lower training.learning_rate, or use training.mixed_precision bf16 instead of fp16"
    if run.step == 0:
        return f"training stopped: {stop}; no step had finished, so nothing was saved; {advice}"
    path = save_lora(run, f"{run.config.output.name}-step{run.step:06d}", stop.epoch)
    if run.accelerator.is_main_process:  # the losses up to the last good step, for the report
        run.history.save(history_path(run.config.output.dir, run.config.output.name))
    return f"training stopped: {stop}; saved the LoRA of step {run.step}, the last good one, to {path}; {advice}"
