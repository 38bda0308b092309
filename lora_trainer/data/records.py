"""Scan dataset folders into records: one image, its caption, its folder's settings, and its upright size.

Only image headers are read here (size and EXIF orientation), so scanning 10,000 images is quick and holds
no pixels. Files that cannot be used are collected as `BadFile`s instead of stopping the scan.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lora_trainer.config.data import IMAGE_EXTENSIONS, DatasetConfig
from lora_trainer.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# kohya's folder convention: "<repeats>_<class tokens>", e.g. "10_ohwx woman".
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# EXIF orientations 5-8 turn the picture by 90 degrees, so its upright width and height swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageRecord:
    image_path: Path
    caption: str  # from the caption file, else the default caption or class tokens; before caption options
    dataset_index: int  # which `datasets` entry it came from (its caption and crop options apply)
    folder: str  # the folder's name, as kohya's metadata keys tag counts and repeats
    repeats: int
    is_reg: bool
    loss_weight: float
    size: tuple[int, int]  # upright (height, width)


@dataclass(frozen=True)
class BadFile:
    path: Path
    reason: str


def stop_on_bad_files(bad: Sequence[BadFile]) -> None:
    """Raise one error listing every bad file, if there are any (`data.on_bad_image: error`)."""
    if bad:
        lines = [f"{problem.path}: {problem.reason}" for problem in bad]
        lines.append(f"{len(bad)} bad data files; fix or remove them, or set data.on_bad_image: skip to train without them")
        raise UserError("\n".join(lines))


@dataclass(frozen=True)
class Folder:
    """One folder of images with its resolved repeats and class tokens."""

    path: Path
    dataset_index: int
    repeats: int
    class_tokens: str | None


@dataclass
class Scan:
    records: list[ImageRecord] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    folders: list[Folder] = field(default_factory=list)


def scan_datasets(datasets: Sequence[DatasetConfig]) -> Scan:
    scan = Scan()
    for index, dataset in enumerate(datasets):
        for folder in resolve_folders(dataset, index):
            scan.folders.append(folder)
            scan_folder(folder, dataset, scan)
    return scan


def resolve_folders(dataset: DatasetConfig, index: int) -> list[Folder]:
    """The dataset's folder itself, or, kohya-style, its `N_name` subfolders when it holds no images directly."""
    if _image_files(dataset.path):
        return [_folder(dataset.path, dataset, index)]
    subfolders = sorted(path for path in dataset.path.iterdir() if path.is_dir() and KOHYA_FOLDER.match(path.name))
    found = [_folder(path, dataset, index) for path in subfolders if _image_files(path)]
    if not found:
        kinds = ", ".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
        raise ConfigError(
            f"datasets.{index}.path: no images ({kinds}) in {dataset.path}, nor in kohya-style subfolders like 10_name"
        )
    return found


def _folder(path: Path, dataset: DatasetConfig, index: int) -> Folder:
    match = KOHYA_FOLDER.match(path.name)
    repeats = dataset.repeats or (int(match.group(1)) if match else 1)
    class_tokens = dataset.class_tokens or (match.group(2).strip() if match else None)
    if repeats < 1:
        raise ConfigError(f"datasets.{index}.path: folder {path.name} asks for {repeats} repeats; name it 1_... or more")
    return Folder(path, index, repeats, class_tokens)


def scan_folder(folder: Folder, dataset: DatasetConfig, scan: Scan) -> None:
    fallback_caption = dataset.default_caption or folder.class_tokens or ""
    uncaptioned = []
    for image_path in _image_files(folder.path):
        size = read_upright_size(image_path)
        if isinstance(size, BadFile):
            scan.bad.append(size)
            continue
        caption = read_caption(image_path, dataset.caption_extensions)
        if isinstance(caption, BadFile):
            scan.bad.append(caption)
            continue
        if caption is None:
            uncaptioned.append(image_path.name)
            caption = fallback_caption
        scan.records.append(
            ImageRecord(
                image_path=image_path,
                caption=caption,
                dataset_index=folder.dataset_index,
                folder=folder.path.name,
                repeats=folder.repeats,
                is_reg=dataset.is_reg,
                loss_weight=dataset.loss_weight,
                size=size,
            )
        )
    if uncaptioned:
        used = f"{fallback_caption!r}" if fallback_caption else "an empty caption"
        log.warning(
            "%d images in %s have no %s caption file and train with %s (first: %s)",
            len(uncaptioned), folder.path, " or ".join(dataset.caption_extensions), used, uncaptioned[0],
        )


def read_upright_size(path: Path) -> tuple[int, int] | BadFile:
    """(height, width) as the picture is meant to be seen, from the header only; or why it cannot be read."""
    try:
        if path.stat().st_size == 0:
            return BadFile(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return BadFile(path, f"cannot read this image ({error})")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def read_caption(image_path: Path, extensions: Sequence[str]) -> str | None | BadFile:
    """The first non-empty line of the first caption file found beside the image (as kohya reads it).

    None when there is no caption file; a BadFile when it is not UTF-8 text.
    """
    for extension in extensions:
        caption_path = image_path.with_suffix(extension)
        if caption_path.is_file():
            try:
                text = caption_path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                return BadFile(caption_path, "caption is not UTF-8 text; re-save it as UTF-8")
            return next((line.strip() for line in text.splitlines() if line.strip()), "")
    return None


def _image_files(folder: Path) -> list[Path]:
    # Dot files are hidden (macOS writes `._name.png` resource forks that are not images).
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )
