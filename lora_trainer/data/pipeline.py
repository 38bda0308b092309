"""From dataset folders to training items: scan, assign buckets, fill the latent cache, report bad files.

Everything that can go wrong with the data is found here, before the first training step: unreadable,
empty or too-small images and non-UTF-8 captions are listed by path and skipped (or stop the run with
`data.on_bad_image: error`), so nothing about the data can fail hours into training.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lora_trainer.config import Config
from lora_trainer.data.buckets import CropPlan, ImageTooSmall, bucket_sizes, plan_for
from lora_trainer.data.cache import CacheOutcome, LatentCache, LatentRequest, fill_latent_cache, vae_fingerprint
from lora_trainer.data.dataset import TrainingItem, epoch_items
from lora_trainer.data.images import UnreadableImage, load_rgb
from lora_trainer.data.records import BadFile, Folder, ImageRecord, scan_datasets
from lora_trainer.errors import UserError
from lora_trainer.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    items: list[TrainingItem]  # one per usable image
    folders: list[Folder]
    bad: list[BadFile] = field(default_factory=list)
    latents: CacheOutcome | None = None  # None when latents are not cached

    @property
    def records(self) -> list[ImageRecord]:
        return [item.record for item in self.items]


def prepare_training_data(
    config: Config, device: torch.device, load_vae: Callable[[], torch.nn.Module], show_progress: bool = True
) -> TrainingData:
    scan = scan_datasets(config.datasets)
    planned, too_small = plan_buckets(scan.records, config)
    bad = scan.bad + too_small
    if config.data.on_bad_image == "error":
        stop_on_bad_files(bad)
    outcome = None
    if config.data.cache_latents:
        items, outcome = with_cached_latents(planned, config, device, load_vae(), show_progress)
        bad += outcome.bad
    else:
        items, unreadable = _with_checked_images(planned, config, show_progress)
        bad += unreadable
    if config.data.on_bad_image == "error":
        stop_on_bad_files(bad)
    for problem in bad:
        log.warning("skipped %s: %s", problem.path, problem.reason)
    if not any(not item.record.is_reg for item in items):
        raise UserError(
            "no usable training images are left (see the skipped files above); every dataset entry with "
            "is_reg: false needs at least one readable image"
        )
    return TrainingData(items, scan.folders, bad, outcome)


def plan_buckets(records: Sequence[ImageRecord], config: Config) -> tuple[list[tuple[ImageRecord, CropPlan]], list[BadFile]]:
    data = config.data
    buckets = bucket_sizes(data.resolution, data.bucket_step, data.smallest_side, data.largest_side)
    planned, too_small = [], []
    for record in records:
        try:
            planned.append((record, plan_for(record.size, buckets, data)))
        except ImageTooSmall as error:
            too_small.append(BadFile(record.image_path, f"{error}; use a larger image or lower data.min_bucket_side"))
    return planned, too_small


def stop_on_bad_files(bad: Sequence[BadFile]) -> None:
    if bad:
        lines = [f"{problem.path}: {problem.reason}" for problem in bad]
        lines.append(f"{len(bad)} bad data files; fix or remove them, or set data.on_bad_image: skip to train without them")
        raise UserError("\n".join(lines))


def with_cached_latents(
    planned, config: Config, device: torch.device, vae: torch.nn.Module, show_progress: bool
) -> tuple[list[TrainingItem], CacheOutcome]:
    cache = LatentCache(config.cache_dir / "latents", vae_fingerprint(vae), config.data.alpha_background)
    requests = []
    for record, plan in planned:
        requests.append(LatentRequest(record, plan, flip=False))
        if config.datasets[record.dataset_index].flip_aug:
            requests.append(LatentRequest(record, plan, flip=True))
    outcome = fill_latent_cache(requests, cache, vae, device, config.data.vae_batch_size, show_progress)
    items = []
    for record, plan in planned:
        upright = outcome.entries.get(LatentRequest(record, plan, flip=False))
        mirrored = outcome.entries.get(LatentRequest(record, plan, flip=True))
        flips = config.datasets[record.dataset_index].flip_aug
        if upright is not None and (mirrored is not None or not flips):
            items.append(TrainingItem(record, plan, upright, mirrored))
    return items, outcome


def _with_checked_images(planned, config: Config, show_progress: bool) -> tuple[list[TrainingItem], list[BadFile]]:
    """Decode every image once up front, since the VAE will read them again every epoch."""
    items, bad = [], []
    for record, plan in progress_bar(planned, desc="checking images", unit="img", disable=not show_progress):
        try:
            load_rgb(record.image_path, config.data.alpha_background)
        except UnreadableImage as error:
            bad.append(BadFile(record.image_path, str(error)))
            continue
        items.append(TrainingItem(record, plan))
    return items, bad


def bucket_table(items: Sequence[TrainingItem], seed: int) -> str:
    """Buckets by size with their image count and how many of them one epoch trains on (repeats and reg)."""
    images = Counter(item.plan.bucket for item in items)
    per_epoch = Counter(item.plan.bucket for item in epoch_items(items, seed))
    lines = [f"{'bucket (w x h)':>16}  {'aspect':>6}  {'images':>6}  {'per epoch':>9}"]
    for height, width in sorted(images, key=lambda size: size[1] / size[0]):
        lines.append(f"{f'{width} x {height}':>16}  {width / height:6.2f}  {images[(height, width)]:6d}  {per_epoch[(height, width)]:9d}")
    return "\n".join(lines)
