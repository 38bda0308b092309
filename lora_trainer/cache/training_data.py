"""From dataset folders to training items: scan, assign buckets, fill the latent cache, report bad files.

Everything that can go wrong with the data is found here, before the first training step: unreadable,
empty or too-small images and non-UTF-8 captions are listed by path and skipped (or stop the run with
`data.on_bad_image: error`), so nothing about the data can fail hours into training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lora_trainer.cache.latents import CachedLatent, CacheOutcome, LatentCache, LatentRequest, fill_latent_cache
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import PlannedImage, plan_buckets
from lora_trainer.data.images import UnreadableImage, load_rgb
from lora_trainer.data.masks import latent_mask, with_loss_masks
from lora_trainer.data.records import BadFile, Folder, ImageRecord, scan_datasets, stop_on_bad_files
from lora_trainer.errors import UserError
from lora_trainer.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingItem(PlannedImage):
    """A planned image ready to train: its cached latents, or None when the VAE encodes it every step."""

    latent: CachedLatent | None = None
    flipped_latent: CachedLatent | None = None  # the mirror image's, with flip_aug


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
    config: Config, latent_cache: LatentCache, device: torch.device, show_progress: bool = True
) -> TrainingData:
    """The usable images of `config.datasets`, with their latents in `latent_cache` when latents are cached."""
    scan = scan_datasets(config.datasets)
    planned, too_small = plan_buckets(with_loss_masks(scan.records, config.datasets), config.data)
    bad = scan.bad + too_small
    if config.data.on_bad_image == "error":
        stop_on_bad_files(bad)
    outcome = None
    if config.data.cache_latents:
        items, outcome = with_cached_latents(planned, config, latent_cache, device, show_progress)
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


def with_cached_latents(
    planned: Sequence[PlannedImage],
    config: Config,
    latent_cache: LatentCache,
    device: torch.device,
    show_progress: bool,
) -> tuple[list[TrainingItem], CacheOutcome]:
    """The planned images whose latents (both orientations with flip_aug) are in the cache, encoding what is missing."""
    requests = []
    for image in planned:
        requests.append(LatentRequest(image.record, image.plan, flip=False))
        if config.datasets[image.record.dataset_index].flip_aug:
            requests.append(LatentRequest(image.record, image.plan, flip=True))
    outcome = fill_latent_cache(requests, latent_cache, device, config.data.vae_batch_size, show_progress)
    items = []
    for image in planned:
        latent = outcome.entries.get(LatentRequest(image.record, image.plan, flip=False))
        flipped_latent = outcome.entries.get(LatentRequest(image.record, image.plan, flip=True))
        flips = config.datasets[image.record.dataset_index].flip_aug
        if latent is not None and (flipped_latent is not None or not flips):
            items.append(TrainingItem(image.record, image.plan, latent, flipped_latent))
    return items, outcome


def _with_checked_images(planned: Sequence[PlannedImage], config: Config, show_progress: bool) -> tuple[list[TrainingItem], list[BadFile]]:
    """Decode every image (and its loss mask) once up front, since the VAE will read them again every epoch."""
    items, bad = [], []
    for image in progress_bar(planned, desc="checking images", unit="img", disable=not show_progress):
        try:
            load_rgb(image.record.image_path, config.data.alpha_background, image.plan.resized)
            if image.record.loss_mask is not None:
                latent_mask(image.record, image.plan)
        except UnreadableImage as error:
            bad.append(BadFile(image.record.image_path, str(error)))
            continue
        items.append(TrainingItem(image.record, image.plan))
    return items, bad
