"""The state of one training run: what setup builds, the loop advances and finalize saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from lora_trainer.cache.training_data import TrainingData
from lora_trainer.config.schema import Config
from lora_trainer.export.metadata import BaseModel
from lora_trainer.fit.evaluate import Evaluator
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
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    step: int = 0
    start_epoch: int = 1  # later when resumed
    resume_batches: int = 0  # global batches of `start_epoch` the saved run had trained
    last_state: Any = None  # the Position of the newest state saved, so one position is never saved twice

    @property
    def noise_scheduler(self) -> Any:
        return self.parts.noise_scheduler
