"""The training set: cached latents with their captions and time_ids, each image `repeats` times per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_trainer.conditioning import time_ids
from lora_trainer.data.cache import CachedLatent
from lora_trainer.data.records import ImageRecord


class LatentDataset(Dataset):
    def __init__(self, records: Sequence[ImageRecord], latents: Sequence[CachedLatent]):
        if len(records) != len(latents):
            raise ValueError("one cached latent per record is needed")
        # Repeats expand the index, so an epoch sees each image `repeats` times, shuffled among the rest.
        self.items = [(record, cached) for record, cached in zip(records, latents) for _ in range(record.repeats)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, cached = self.items[index]
        crop = cached.crop
        return {
            "latents": cached.load(),
            "time_ids": time_ids(crop.original_size, crop.crop_top_left, crop.target_size),
            "caption": record.caption,
        }


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latents": torch.stack([example["latents"] for example in examples]),
        "time_ids": torch.stack([example["time_ids"] for example in examples]),
        "captions": [example["caption"] for example in examples],
    }
