"""The state of one training run: what setup builds, the loop advances and finalize saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from lora_trainer.cache.training_data import TrainingData
from lora_trainer.config.schema import Config
from lora_trainer.export.metadata import BaseModel
from lora_trainer.fit.ema import AdapterEMA
from lora_trainer.fit.evaluate import Evaluator
from lora_trainer.fit.objective import NoiseDraw, draw_training_noise
from lora_trainer.model.conditioning import CaptionEncoder
from lora_trainer.model.parts import SDXLParts
from lora_trainer.report.history import RunHistory


@dataclass
class Run:
    config: Config  # with mixed_precision resolved
    accelerator: Any
    parts: SDXLParts  # the model, each part loaded once and shared by every stage
    data: TrainingData  # the images training sees (held-out ones taken out)
    unet: torch.nn.Module  # as Accelerate prepared it when it trains
    trained: dict[str, torch.nn.Module]  # part name -> prepared model whose adapters train
    encode_captions: CaptionEncoder  # through the training encoders, or from the text cache
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    total_steps: int
    epochs: int
    batches_per_epoch: int  # global batches (each process takes its share of every one)
    history: RunHistory
    evaluator: Evaluator  # validation loss and sample images between epochs
    base: BaseModel  # what the LoRA's metadata says it was trained on
    data_fingerprint: str  # names the images and captions, so a resume on other data is refused
    vae: torch.nn.Module | None = None  # set when images are encoded every step instead of cached
    ema: AdapterEMA | None = None  # the average of the adapters that is saved and evaluated (training.ema)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    step: int = 0
    start_epoch: int = 1  # later when resumed
    resume_batches: int = 0  # global batches of `start_epoch` the saved run had trained
    last_state: Any = None  # the Position of the newest state saved, so one position is never saved twice

    @property
    def noise_scheduler(self) -> Any:
        """The training schedule: the model's betas, rescaled to zero terminal SNR with `objective.zero_terminal_snr`."""
        return self.parts.noise_scheduler_for(self.config.objective.zero_terminal_snr)

    def draw_noise(self, latents: torch.Tensor, seeds: list[int]) -> NoiseDraw:
        """This batch's noise and timesteps (`fit.objective.draw_training_noise`), the timesteps counted in the
        history: each process counts its own draws, and the main process's history is the one saved."""
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        draw = draw_training_noise(latents, seeds, self.config.objective, num_train_timesteps)
        self.history.count_timesteps(draw.timesteps_on_cpu.tolist(), num_train_timesteps)
        return draw
