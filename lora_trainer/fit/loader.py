"""The training batches: one item per image per repeat, each giving latents (or pixels), caption, time_ids and
loss weight (and its loss mask under `objective.masked_loss`), in batches of one bucket, this process's share, on
its device.

An item's random choices (flip, caption shuffle and dropout, random crop) come from a generator seeded
by the run's seed, the epoch and the item, so they change every epoch and repeat exactly across runs.
"""

from __future__ import annotations

import random
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_trainer.cache.training_data import TrainingData, TrainingItem
from lora_trainer.config.data import DatasetConfig
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import CropPlan, random_crop
from lora_trainer.data.captions import training_caption
from lora_trainer.data.epochs import epoch_items
from lora_trainer.data.images import UnreadableImage, apply_plan, load_rgb, to_model_input
from lora_trainer.data.masks import full_mask, latent_mask
from lora_trainer.errors import UserError
from lora_trainer.fit.batches import BucketBatches, DataKey, noise_seed
from lora_trainer.model.conditioning import time_ids


def make_dataloader(data: TrainingData, config: Config, accelerator: Any) -> Any:
    """Batches of one bucket each; this process's share of them, already on its device."""
    from accelerate.data_loader import prepare_data_loader

    seed = config.training.seed
    dataset = TrainingDataset(
        epoch_items(data.items, seed), config.datasets, seed, config.data.alpha_background, config.objective.masked_loss
    )
    batches = BucketBatches(dataset.buckets(), config.training.batch_size, seed, accelerator.num_processes, accelerator.process_index)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=config.data.workers,
        persistent_workers=config.data.workers > 0, worker_init_fn=prepare_worker if config.data.workers else None,
        # Its own generator: each new epoch's iterator draws a seed from it, which from torch's global generator
        # would shift the adapters' dropout after a resume (the resumed run starts its iterator at another time).
        generator=torch.Generator().manual_seed(seed),
    )
    # Our batches are already split between processes; Accelerate only tracks the loader's end (for
    # gradient accumulation) and moves batches to the device.
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True)


class TrainingDataset(Dataset):
    def __init__(
        self, items: Sequence[TrainingItem], datasets: Sequence[DatasetConfig], seed: int, background: tuple[int, int, int],
        masked_loss: bool = False,
    ):
        self.items = list(items)
        self.datasets = datasets
        self.seed = seed
        self.background = background
        self.masked_loss = masked_loss  # each example then carries its loss mask at the latent size

    def __len__(self) -> int:
        return len(self.items)

    def buckets(self) -> list[tuple[int, int]]:
        return [item.plan.bucket for item in self.items]

    def __getitem__(self, key: DataKey | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key[0], key[1]
        item = self.items[index]
        options = self.datasets[item.record.dataset_index]
        rng = random.Random(f"item:{self.seed}:{epoch}:{index}")
        flip = options.flip_aug and rng.random() < 0.5
        plan = random_crop(item.plan, rng) if options.random_crop else item.plan
        example = {
            "caption": training_caption(item.record.caption, options, rng),
            "time_ids": _time_ids(plan.flipped() if flip else plan),
            "loss_weight": torch.tensor(item.record.loss_weight, dtype=torch.float32),
        }
        if isinstance(key, DataKey):
            example["noise_seed"] = noise_seed(self.seed, key)
        if item.latent is None:
            try:
                image = load_rgb(item.record.image_path, self.background, plan.resized)
            except UnreadableImage as error:
                raise UserError(f"{item.record.image_path}: {error}; it was readable when training started") from None
            example["pixels"] = to_model_input(apply_plan(image, plan, flip))
            example["image_path"] = str(item.record.image_path)
        else:
            example["latents"] = (item.flipped_latent if flip else item.latent).load()
        if self.masked_loss:
            example["loss_mask"] = _loss_mask(item, plan, flip)
        return example


def _time_ids(plan: CropPlan) -> torch.Tensor:
    return time_ids(plan.original, plan.crop_top_left, plan.bucket)


def _loss_mask(item: TrainingItem, plan: CropPlan, flip: bool) -> torch.Tensor:
    """The item's mask [1, h, w] as cut by `plan`: from its cache entry, made now when the VAE encodes every step,
    or all ones for an image whose dataset gives no masks."""
    if item.record.loss_mask is None:
        return full_mask(plan.bucket)
    if item.latent is not None:
        return (item.flipped_latent if flip else item.latent).load_mask()
    try:
        return latent_mask(item.record, plan, flip)
    except UnreadableImage as error:
        raise UserError(f"{item.record.image_path}: {error}; it was readable when training started") from None


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "time_ids": torch.stack([example["time_ids"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "loss_weights": torch.stack([example["loss_weight"] for example in examples]),
    }
    if "noise_seed" in examples[0]:
        batch["noise_seeds"] = [example["noise_seed"] for example in examples]
    source = "latents" if "latents" in examples[0] else "pixels"
    batch[source] = torch.stack([example[source] for example in examples])
    if source == "pixels":
        batch["image_paths"] = [example["image_path"] for example in examples]
    if "loss_mask" in examples[0]:
        batch["loss_masks"] = torch.stack([example["loss_mask"] for example in examples])
    return batch


def prepare_worker(_worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which finishes its step and saves (a terminal sends
    SIGINT to every process of the group, and a worker dying of it would end the run at once). And a worker
    whose main process stopped while taking a batch from it has nothing to report: the main process says why
    it stopped; torch's file-descriptor transfer would print a traceback of the dropped connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_dropped_transfers


def _quiet_dropped_transfers(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    if not isinstance(error, (EOFError, OSError)):  # a connection the main process dropped
        sys.__excepthook__(kind, error, traceback)
