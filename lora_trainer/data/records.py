"""Scan dataset folders into records: one image, its caption, and how often it is repeated."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.config import IMAGE_EXTENSIONS, DatasetConfig
from lora_trainer.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    image_path: Path
    caption: str
    repeats: int
    dataset_index: int


def scan_datasets(datasets: Sequence[DatasetConfig]) -> list[ImageRecord]:
    return [record for index, dataset in enumerate(datasets) for record in scan_folder(dataset, index)]


def scan_folder(dataset: DatasetConfig, index: int) -> list[ImageRecord]:
    images = sorted(path for path in dataset.path.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        kinds = ", ".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
        raise ConfigError(f"datasets.{index}.path: no images ({kinds}) in {dataset.path}")
    records = [ImageRecord(image, read_caption(image, dataset.caption_extension), dataset.repeats, index) for image in images]
    uncaptioned = [record.image_path.name for record in records if not record.caption]
    if uncaptioned:
        log.warning(
            "%d of %d images in %s have no %s caption and train with an empty caption (first: %s)",
            len(uncaptioned), len(records), dataset.path, dataset.caption_extension, uncaptioned[0],
        )
    return records


def read_caption(image_path: Path, extension: str) -> str:
    """The first non-empty line of the caption file beside the image (as kohya reads it), or '' if none."""
    caption_path = image_path.with_suffix(extension)
    if not caption_path.is_file():
        return ""
    try:
        text = caption_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{caption_path}: not UTF-8 text; re-save the caption file as UTF-8") from None
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
