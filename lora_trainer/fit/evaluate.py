"""What happens between epochs besides saving: the validation loss and sample images, recorded in the history.

Both run on the main process only, on the unwrapped models (a DDP-wrapped forward on one process
would wait forever for the others), in eval mode, and leave the models as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lora_trainer.cache.fill import ValidationSet
from lora_trainer.config.schema import Config
from lora_trainer.fit.accelerator import tensorboard
from lora_trainer.fit.samples import SampleDrawer
from lora_trainer.fit.validation import validation_loss
from lora_trainer.model.conditioning import CaptionEncoder
from lora_trainer.report.history import RunHistory, history_path

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    config: Config
    accelerator: Any
    history: RunHistory
    trained: dict[str, torch.nn.Module]  # the models whose adapters train, switched to eval mode to measure
    unet: torch.nn.Module  # unwrapped, adapters included
    noise_scheduler: Any
    encode_captions: CaptionEncoder  # through the unwrapped (or cached) text encoders
    validation: ValidationSet | None
    drawer: SampleDrawer | None  # None without sample prompts, and on every process but the main one
    weights: Callable[[], AbstractContextManager[Any]] = nullcontext  # the run's `evaluation_weights` (EMA), set by setup

    def after_epoch(self, epoch: int, step: int, last: bool) -> None:
        """After `epoch` (0: before training): validation loss and samples when they are due; history saved."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with self.weights():
                if self.validation is not None and self._validation_due(epoch, last):
                    self._measure_validation(epoch, step)
                if self.drawer is not None and self._samples_due(epoch, last):
                    self.drawer.draw_round(epoch, step, self.history, tensorboard(self.accelerator))
            self.history.save(history_path(self.config.output.dir, self.config.output.name))
        self.accelerator.wait_for_everyone()

    def draws_after_step(self, step: int) -> bool:
        """Whether `after_step(step)` draws samples (decided alike on every process)."""
        every = self.config.sample.every_n_steps
        return bool(self.config.sample.enabled and every and step % every == 0)

    def after_step(self, epoch: int, step: int) -> None:
        """The in-between rounds of `sample.every_n_steps`: saved and logged, not part of the epoch grid."""
        if not self.draws_after_step(step):
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with self.weights():
                self.drawer.draw_round(epoch, step, None, tensorboard(self.accelerator))
        self.accelerator.wait_for_everyone()

    def _validation_due(self, epoch: int, last: bool) -> bool:
        return epoch == 0 or last or epoch % self.config.validation.every_n_epochs == 0

    def _samples_due(self, epoch: int, last: bool) -> bool:
        settings = self.config.sample
        if epoch == 0:
            return settings.before_training
        return last or bool(settings.every_n_epochs and epoch % settings.every_n_epochs == 0)

    def _measure_validation(self, epoch: int, step: int) -> None:
        settings = self.config.validation
        with self._eval_mode(), self.accelerator.autocast():
            loss = validation_loss(
                self.unet, self.encode_captions, self.noise_scheduler, self.validation, settings.timesteps, settings.seed,
                self.accelerator.device, self.config.training.batch_size,
            )
        self.history.epoch_record(epoch, step).validation_loss = loss
        self.accelerator.log({"loss/validation": loss}, step=step)
        log.info("epoch %d: validation loss %.5f", epoch, loss)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        models = [self.accelerator.unwrap_model(model) for model in self.trained.values()]
        modes = [model.training for model in models]
        try:
            for model in models:
                model.eval()
            with torch.no_grad():
                yield
        finally:
            for model, mode in zip(models, modes):
                model.train(mode)
