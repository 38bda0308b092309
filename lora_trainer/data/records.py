"""Scan dataset folders into records: one image, its caption, its folder's settings, and its upright size.

Only image headers are read here (size, EXIF orientation, animation), so scanning 10,000 images is quick and holds
no pixels. Files that cannot be used are collected as `BadFile`s instead of stopping the scan.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
# Pillow refuses images over about 179 megapixels as possible decompression bombs, which a large phone photo
# or a panorama passes. Ours is far higher, yet one image still decodes in a few GB (1 gigapixel: 3 GB RGB).
PIXEL_LIMIT = 1_000_000_000
# Pillow's limit is a module global: it is lifted under this lock and put back, so our own threads never
# leave it lifted for good by restoring each other's value.
_PILLOW_LIMIT_LOCK = threading.RLock()
# Only these formats animate. A JPEG with several frames (MPO) is one photo plus a depth map or preview.
_ANIMATED_FORMATS = {"GIF", "PNG", "WEBP"}
# How many file names a warning line lists.
_NAMES_SHOWN = 3


@dataclass(frozen=True)
class LossMask:
    """Where one image's loss mask comes from (`data.masks` reads it)."""

    file: Path | None = None  # a mask image in the dataset's mask_dir; None: the image's own alpha channel


@dataclass(frozen=True)
class ImageRecord:
    image_path: Path
    caption: str  # from the caption file, else (none or empty) the default caption or class tokens; before options
    dataset_index: int  # which `datasets` entry it came from (its caption and crop options apply)
    folder: str  # the folder's name, as kohya's metadata keys tag counts and repeats
    repeats: int
    is_reg: bool
    loss_weight: float
    size: tuple[int, int]  # upright (height, width)
    loss_mask: LossMask | None = None  # where its loss mask comes from (objective.masked_loss); None: no mask


@dataclass(frozen=True)
class BadFile:
    path: Path
    reason: str


class ImageTooLarge(Exception):
    """More pixels than `PIXEL_LIMIT`; the message names its size and the limit."""


@dataclass(frozen=True)
class ImageHeader:
    size: tuple[int, int]  # upright (height, width)
    animated: bool


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
    if image_files(dataset.path):
        return [_folder(dataset.path, dataset, index)]
    subfolders = sorted(path for path in dataset.path.iterdir() if path.is_dir() and KOHYA_FOLDER.match(path.name))
    found = [_folder(path, dataset, index) for path in subfolders if image_files(path)]
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
    uncaptioned, empty_captions, animated = [], [], []
    for image_path in image_files(folder.path):
        header = read_header(image_path)
        if isinstance(header, BadFile):
            scan.bad.append(header)
            continue
        caption = read_caption(image_path, dataset.caption_extensions)
        if isinstance(caption, BadFile):
            scan.bad.append(caption)
            continue
        if caption is None:
            uncaptioned.append(image_path.name)
        elif not caption:
            empty_captions.append(caption_file(image_path, dataset.caption_extensions).name)
        if header.animated:
            animated.append(image_path.name)
        scan.records.append(
            ImageRecord(
                image_path=image_path,
                caption=caption or fallback_caption,
                dataset_index=folder.dataset_index,
                folder=folder.path.name,
                repeats=folder.repeats,
                is_reg=dataset.is_reg,
                loss_weight=dataset.loss_weight,
                size=header.size,
            )
        )
    _warn_about_folder(folder.path, dataset.caption_extensions, fallback_caption, uncaptioned, empty_captions, animated)


def _warn_about_folder(
    path: Path, caption_extensions: Sequence[str], fallback_caption: str,
    uncaptioned: list[str], empty_captions: list[str], animated: list[str],
) -> None:
    """One warning line per kind of file that trains other than its name suggests; nothing stops the run."""
    if uncaptioned:
        used = f"{fallback_caption!r}" if fallback_caption else "an empty caption"
        log.warning(
            "%d images in %s have no %s caption file and train with %s (first: %s)",
            len(uncaptioned), path, " or ".join(caption_extensions), used, uncaptioned[0],
        )
    if empty_captions:
        used = (
            f"the folder's fallback caption {fallback_caption!r}" if fallback_caption
            else "an empty caption (the folder has no default_caption or class tokens)"
        )
        log.warning(
            "%d caption files in %s are empty, so their images train with %s (%s); write a caption in them to use it",
            len(empty_captions), path, used, first_names(empty_captions),
        )
    if animated:
        log.warning(
            "%d animated images in %s train on their first frame only (%s); "
            "save other frames as images of their own to train on them",
            len(animated), path, first_names(animated),
        )


def first_names(names: Sequence[str]) -> str:
    """'a.png, b.png, c.png and 4 more': a warning line stays one line however many files it is about."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    return f"{shown} and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else shown


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """The image opened (pixels not yet decoded) under our pixel limit instead of Pillow's; raise `ImageTooLarge`.

    Decode it inside the `with`: Pillow checks its limit again while decoding some formats (GIF frames).
    Lifting Pillow's limit also keeps its DecompressionBombWarning from reaching the user.
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as image:
                check_pixel_limit(image.size)
                yield image
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_pixel_limit(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > PIXEL_LIMIT:
        raise ImageTooLarge(
            f"{width}x{height} is {width * height / 1e6:,.0f} megapixels, over the limit of {PIXEL_LIMIT / 1e6:,.0f} "
            "megapixels for one image; downscale it (or cut a panorama into parts) and train on that"
        )


def read_header(path: Path) -> ImageHeader | BadFile:
    """The upright size and whether it animates, from the header only; or why the image cannot be used."""
    try:
        if path.stat().st_size == 0:
            return BadFile(path, "empty file (0 bytes)")
        with open_image(path) as image:
            width, height = image.size
            sideways = turns_sideways(image)
            animated = image.format in _ANIMATED_FORMATS and getattr(image, "is_animated", False)
    except ImageTooLarge as error:
        return BadFile(path, str(error))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return BadFile(path, f"cannot read this image ({error})")
    return ImageHeader((width, height) if sideways else (height, width), animated)


def turns_sideways(image: Image.Image) -> bool:
    """Whether the EXIF orientation turns the stored picture by 90 degrees (its upright sides swap)."""
    return image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS


def read_caption(image_path: Path, extensions: Sequence[str]) -> str | None | BadFile:
    """The first non-empty line of the first caption file found beside the image (as kohya reads it).

    None when there is no caption file; "" when it is empty or only whitespace; a BadFile when it is not
    UTF-8 text. `scan_folder` trains an empty one like a missing one, with the folder's default caption or
    class tokens. kohya instead trains a blank file with an empty caption (and stops on a 0-byte one), but an
    empty caption file is nearly always a tagger that found nothing or a placeholder never filled, and an
    empty caption teaches the image without its trigger word; `caption_dropout` is the way to train uncaptioned.
    """
    caption_path = caption_file(image_path, extensions)
    if caption_path is None:
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return BadFile(caption_path, "caption is not UTF-8 text; re-save it as UTF-8")
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def caption_file(image_path: Path, extensions: Sequence[str]) -> Path | None:
    """The image's caption file: the same stem with the first of `extensions` that exists."""
    for extension in extensions:
        path = image_path.with_suffix(extension)
        if path.is_file():
            return path
    return None


def image_files(folder: Path) -> list[Path]:
    # Dot files are hidden (macOS writes `._name.png` resource forks that are not images).
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )
