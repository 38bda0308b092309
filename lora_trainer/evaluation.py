"""What happens between epochs besides saving: the validation loss and sample images, recorded in the history.

Both run on the main process only, on the unwrapped models (a DDP-wrapped forward on one process
would wait forever for the others), in eval mode, and leave the models as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from lora_trainer.history import history_path
from lora_trainer.validation import validation_loss

if TYPE_CHECKING:
    from lora_trainer.train import Run

log = logging.getLogger(__name__)


def evaluate_epoch(run: Run, epoch: int, last: bool) -> None:
    """After `epoch` (0: before training): validation loss and samples when they are due; history saved."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run.validation is not None and _validation_due(run, epoch, last):
            _measure_validation(run, epoch)
        if run.sampler is not None and _samples_due(run, epoch, last):
            run.sampler.draw_round(epoch, run.step, run.history, _tensorboard(run))
        run.history.save(history_path(run.config.output.dir, run.config.output.name))
    accelerator.wait_for_everyone()


def sample_by_step(run: Run, epoch: int) -> None:
    """The in-between rounds of `sample.every_n_steps`: saved and logged, not part of the epoch grid."""
    every = run.config.sample.every_n_steps
    if run.sampler is None or not every or run.step % every:
        return
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.sampler.draw_round(epoch, run.step, None, _tensorboard(run))
    run.accelerator.wait_for_everyone()


def _validation_due(run: Run, epoch: int, last: bool) -> bool:
    return epoch == 0 or last or epoch % run.config.validation.every_n_epochs == 0


def _samples_due(run: Run, epoch: int, last: bool) -> bool:
    settings = run.config.sample
    if epoch == 0:
        return settings.before_training
    return last or bool(settings.every_n_epochs and epoch % settings.every_n_epochs == 0)


def _measure_validation(run: Run, epoch: int) -> None:
    unet = run.accelerator.unwrap_model(run.unet)
    settings = run.config.validation
    with eval_mode(run), run.accelerator.autocast():
        loss = validation_loss(
            unet, run.evaluation_encoder, run.noise_scheduler, run.validation, settings.timesteps, settings.seed,
            run.accelerator.device, run.config.training.batch_size,
        )
    run.history.epoch_record(epoch, run.step).validation_loss = loss
    run.accelerator.log({"loss/validation": loss}, step=run.step)
    log.info("epoch %d: validation loss %.5f", epoch, loss)


@contextmanager
def eval_mode(run: Run) -> Iterator[None]:
    models = [run.accelerator.unwrap_model(model) for model in run.trained.values()]
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def _tensorboard(run: Run):
    try:
        return run.accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return None
