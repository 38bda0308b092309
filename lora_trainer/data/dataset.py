"""The training set: one item per image per repeat, each giving latents (or pixels), caption, time_ids, loss weight.

An item's random choices (flip, caption shuffle and dropout, random crop) come from a generator seeded
by the run's seed, the epoch and the item, so they change every epoch and repeat exactly across runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_trainer.conditioning import time_ids
from lora_trainer.config import DatasetConfig
from lora_trainer.data.buckets import CropPlan, random_crop
from lora_trainer.data.cache import CachedLatent
from lora_trainer.data.captions import training_caption
from lora_trainer.data.images import UnreadableImage, apply_plan, load_rgb, to_model_input
from lora_trainer.data.records import ImageRecord
from lora_trainer.errors import UserError


@dataclass(frozen=True)
class TrainingItem:
    record: ImageRecord
    plan: CropPlan
    upright: CachedLatent | None = None  # cached latents; None when the VAE encodes every step
    mirrored: CachedLatent | None = None  # cached latents of the mirror image, with flip_aug


def epoch_items(items: Sequence[TrainingItem], seed: int) -> list[TrainingItem]:
    """What one epoch trains on: every training image `repeats` times, and as many regularization images.

    As in kohya, regularization images never lengthen the epoch: their pool (each reg image `repeats`
    times) is shuffled once from the seed and cut, or cycled, to the number of training images.
    """
    training = [item for item in items if not item.record.is_reg for _ in range(item.record.repeats)]
    pool = [item for item in items if item.record.is_reg for _ in range(item.record.repeats)]
    if not pool:
        return training
    random.Random(f"regularization:{seed}").shuffle(pool)
    return training + [pool[index % len(pool)] for index in range(len(training))]


class TrainingDataset(Dataset):
    def __init__(self, items: Sequence[TrainingItem], datasets: Sequence[DatasetConfig], seed: int, background: tuple[int, int, int]):
        self.items = list(items)
        self.datasets = datasets
        self.seed = seed
        self.background = background

    def __len__(self) -> int:
        return len(self.items)

    def buckets(self) -> list[tuple[int, int]]:
        return [item.plan.bucket for item in self.items]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        item = self.items[index]
        options = self.datasets[item.record.dataset_index]
        rng = random.Random(f"item:{self.seed}:{epoch}:{index}")
        flip = options.flip_aug and rng.random() < 0.5
        plan = random_crop(item.plan, rng) if options.random_crop else item.plan
        example = {
            "caption": training_caption(item.record.caption, options, rng),
            "time_ids": _time_ids(plan.mirrored() if flip else plan),
            "loss_weight": torch.tensor(item.record.loss_weight, dtype=torch.float32),
        }
        if item.upright is None:
            try:
                image = load_rgb(item.record.image_path, self.background)
            except UnreadableImage as error:
                raise UserError(f"{item.record.image_path}: {error}; it was readable when training started") from None
            example["pixels"] = to_model_input(apply_plan(image, plan, flip))
        else:
            example["latents"] = (item.mirrored if flip else item.upright).load()
        return example


def _time_ids(plan: CropPlan) -> torch.Tensor:
    return time_ids(plan.original, plan.crop_top_left, plan.bucket)


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "time_ids": torch.stack([example["time_ids"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "loss_weights": torch.stack([example["loss_weight"] for example in examples]),
    }
    source = "latents" if "latents" in examples[0] else "pixels"
    batch[source] = torch.stack([example[source] for example in examples])
    return batch
