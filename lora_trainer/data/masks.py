"""Loss masks (`objective.masked_loss`): how much each pixel of an image counts in the denoising loss, 0 to 1.

An image's mask is its own alpha channel (`datasets.N.alpha_mask`, kohya's `alpha_mask`) or a greyscale image of
the same name in `datasets.N.mask_dir` (kohya's `conditioning_data_dir` under `masked_loss`). It goes through its
image's very resize, crop and flip (`apply_plan`); then each 8x8 block of pixels, the block one latent cell
encodes, is averaged into that cell's weight. That is kohya's `interpolate(mode="area")` down to the loss's size
(library/custom_train_functions.py, `apply_masked_loss`), exact here since bucket sides are multiples of 32.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.config.data import IMAGE_EXTENSIONS, DatasetConfig
from lora_trainer.data.buckets import CropPlan, Size
from lora_trainer.data.images import UnreadableImage, apply_plan, sixteen_to_eight_bits
from lora_trainer.data.records import (
    BadFile, ImageRecord, ImageTooLarge, LossMask, first_names, image_files, open_image, read_header, resolve_folders,
)
from lora_trainer.errors import ConfigError, UserError

log = logging.getLogger(__name__)

LATENT_FACTOR = 8  # SDXL's VAE: one latent cell per 8x8 pixels
MASK_FORMAT = 1  # how a mask becomes its latent-size weights; in the cache key, so a change here re-encodes
ALPHA = "alpha"  # the cache key's mask source for an alpha mask: its pixels are in the image's digest already
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


# Matching a mask folder to its images ----------------------------------------------------------------------


@dataclass
class MaskFolderMatch:
    """A dataset's images matched by file stem to the mask images at the same place under its `mask_dir`."""

    masks: dict[Path, Path] = field(default_factory=dict)  # image -> its mask
    unmatched: list[tuple[Path, Path]] = field(default_factory=list)  # (image, the folder its mask was looked for in)
    ambiguous: list[tuple[Path, list[Path]]] = field(default_factory=list)  # an image with several masks of its stem
    orphans: list[Path] = field(default_factory=list)  # masks with no image of their stem


def match_masks(dataset: DatasetConfig) -> MaskFolderMatch:
    """Each image with the mask of its stem in the same place under `mask_dir`: `path/a.png` -> `mask_dir/a.*`,
    and for kohya-style subfolders `path/10_cat/a.png` -> `mask_dir/10_cat/a.*`. Any image extension will do."""
    match = MaskFolderMatch()
    try:
        folders = resolve_folders(dataset, 0)
    except ConfigError:
        return match  # no images at all: the scan says so, naming the dataset
    for folder in folders:
        mask_folder = dataset.mask_dir / folder.path.relative_to(dataset.path)
        _match_folder(image_files(folder.path), mask_folder, match)
    return match


def _match_folder(images: Sequence[Path], mask_folder: Path, match: MaskFolderMatch) -> None:
    by_stem = _images_by_stem(mask_folder)
    for image in images:
        candidates = by_stem.get(image.stem, [])
        if len(candidates) == 1:
            match.masks[image] = candidates[0]
        elif candidates:
            match.ambiguous.append((image, candidates))
        else:
            match.unmatched.append((image, mask_folder))
    stems = {image.stem for image in images}
    match.orphans.extend(mask for stem, masks in sorted(by_stem.items()) if stem not in stems for mask in masks)


def _images_by_stem(folder: Path) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                by_stem[path.stem].append(path)
    return by_stem


def check_mask_folders(datasets: Sequence[DatasetConfig], source: str) -> None:
    """Raise ConfigError (`source: datasets.N.mask_dir: ...`) for the first dataset whose mask folder does not fit
    its images; for the commands to call right after the config loads, before any model loads or file is written."""
    for index, dataset in enumerate(datasets):
        if dataset.mask_dir is not None and (problem := mask_folder_problem(match_masks(dataset))):
            raise ConfigError(f"{source}: datasets.{index}.mask_dir: {problem}")


def mask_folder_problem(match: MaskFolderMatch) -> str | None:
    """Why the mask folder does not fit its images (the first image without exactly one mask), or None."""
    if match.unmatched:
        image, folder = match.unmatched[0]
        others = len(match.unmatched) - 1
        more = f"; {others} more images have no mask either" if others else ""
        return (
            f"no mask for image '{image.name}' (looked for {image.stem}.* in {folder}){more}; give each image a mask "
            "image of the same name, white where the loss counts and black where it does not"
        )
    if match.ambiguous:
        image, masks = match.ambiguous[0]
        return (
            f"{len(masks)} masks for image '{image.name}' ({', '.join(mask.name for mask in masks)} in {masks[0].parent}); "
            "keep one of them"
        )
    return None


# Attaching masks to the scanned records --------------------------------------------------------------------


def with_loss_masks(records: Sequence[ImageRecord], datasets: Sequence[DatasetConfig]) -> list[ImageRecord]:
    """The records, each with its dataset's mask source; raise UserError for a mask that does not fit its image.

    A mask without an image of its name is not used, with a warning (an image dropped from the dataset whose
    mask stayed behind is harmless; an image renamed without its mask is an error of its own, no mask). An image
    without an alpha channel under `alpha_mask` trains everywhere, as kohya's RGBA conversion gives it an
    alpha of 255, with one warning line per dataset.
    """
    masks = _mask_files(datasets)
    result, lacking_alpha, wrong_sizes = [], defaultdict(list), []
    for record in records:
        dataset = datasets[record.dataset_index]
        if dataset.alpha_mask:
            if not _file_has_alpha(record.image_path):
                lacking_alpha[record.dataset_index].append(record.image_path.name)
            record = replace(record, loss_mask=LossMask())
        elif dataset.mask_dir is not None:
            mask = masks[record.dataset_index].get(record.image_path)
            if mask is None:  # the image appeared after the config was checked
                raise UserError(f"datasets.{record.dataset_index}.mask_dir: no mask for image {record.image_path}")
            if problem := _size_problem(record, mask):
                wrong_sizes.append(problem)
            record = replace(record, loss_mask=LossMask(mask))
        result.append(record)
    if wrong_sizes:
        more = f" ({len(wrong_sizes) - 1} more masks do not fit their images either)" if len(wrong_sizes) > 1 else ""
        raise UserError(wrong_sizes[0] + more)
    _warn_about_missing_alpha(lacking_alpha)
    return result


def _mask_files(datasets: Sequence[DatasetConfig]) -> dict[int, dict[Path, Path]]:
    """Each mask_dir dataset's image -> mask, warning once per dataset about masks with no image."""
    masks = {}
    for index, dataset in enumerate(datasets):
        if dataset.mask_dir is None:
            continue
        match = match_masks(dataset)
        masks[index] = match.masks
        if match.orphans:
            log.warning(
                "datasets.%d.mask_dir: %d masks have no image of their name in %s and are not used (%s)",
                index, len(match.orphans), dataset.path, first_names([mask.name for mask in match.orphans]),
            )
    return masks


def _size_problem(record: ImageRecord, mask: Path) -> str | None:
    """Why the mask cannot serve its image (unreadable, or not the image's upright size), in one line; or None."""
    field_name = f"datasets.{record.dataset_index}.mask_dir"
    header = read_header(mask)
    if isinstance(header, BadFile):
        return f"{field_name}: mask {mask}: {header.reason}"
    if header.size != record.size:
        return (
            f"{field_name}: mask {mask} is {_shown(header.size)} but its image {record.image_path.name} is "
            f"{_shown(record.size)}; a mask must have its image's size"
        )
    return None


def _warn_about_missing_alpha(lacking_alpha: dict[int, list[str]]) -> None:
    for index, names in lacking_alpha.items():
        log.warning(
            "datasets.%d.alpha_mask: %d images have no alpha channel and train everywhere, a mask of ones (%s); "
            "save them with transparency where the loss should not count",
            index, len(names), first_names(names),
        )


def _shown(size: Size) -> str:
    height, width = size
    return f"{width}x{height}"


# Reading a mask --------------------------------------------------------------------------------------------


def latent_mask(record: ImageRecord, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """The record's mask cut as `plan` cuts its image, as weights [1, h, w] at the latent size (bucket / 8):
    the mean of each 8x8 block of mask pixels, 0 (ignored) to 1 (trained). `UnreadableImage` if it cannot be read."""
    cut = apply_plan(mask_image(record), plan, flip)
    pixels = torch.from_numpy(np.asarray(cut, dtype=np.float32) / 255.0)[None, None]
    return F.adaptive_avg_pool2d(pixels, latent_size(plan.bucket))[0]


def full_mask(bucket: Size) -> torch.Tensor:
    """The mask of an image whose dataset gives none under masked loss: every latent cell counts fully."""
    return torch.ones(1, *latent_size(bucket))


def latent_size(bucket: Size) -> Size:
    height, width = bucket
    return height // LATENT_FACTOR, width // LATENT_FACTOR


def mask_image(record: ImageRecord) -> Image.Image:
    """The record's mask upright at its image's size, 8-bit greyscale: 255 trains fully, 0 not at all.

    A mask file is read as Pillow's greyscale (luminance; kohya reads the red channel, the same for a grey
    mask), its own transparency ignored. An alpha mask is the image's alpha channel, all 255 without one.
    """
    mask = record.loss_mask
    if mask is None:
        raise ValueError(f"{record.image_path} has no loss mask")
    path = mask.file or record.image_path
    try:
        with open_image(path) as opened:
            if mask.file is None and not has_alpha(opened):
                height, width = record.size
                return Image.new("L", (width, height), 255)
            upright = ImageOps.exif_transpose(opened)
            upright.load()
    except ImageTooLarge as error:
        raise UnreadableImage(_reason(mask, str(error))) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(_reason(mask, f"cannot read this image ({error})")) from None
    return upright.convert("RGBA").getchannel("A") if mask.file is None else _greyscale(upright, mask.file)


def _reason(mask: LossMask, reason: str) -> str:
    return reason if mask.file is None else f"its mask {mask.file}: {reason}"


def _greyscale(image: Image.Image, path: Path) -> Image.Image:
    if image.mode == "F":
        raise UnreadableImage(f"its mask {path}: 32-bit float pixels (mode F) are not supported; save it as an 8-bit PNG")
    if image.mode.startswith("I"):
        return sixteen_to_eight_bits(image)
    return image.convert("L")


def has_alpha(image: Image.Image) -> bool:
    """Whether the opened image has an alpha channel (or a transparent palette entry), from its header."""
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _file_has_alpha(path: Path) -> bool:
    try:
        with open_image(path) as opened:
            return has_alpha(opened)
    except (ImageTooLarge, UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return True  # the image itself fails to decode later and is reported as such, not as lacking alpha
