"""Every image's fate in a run (kept, upscaled, held out, dropped and why) and the batches its buckets make,
decided by the code training runs, from image headers only.

The path is training's own up to the latent cache: `scan_datasets`, `with_loss_masks`, `plan_buckets`, the
`on_bad_image` rule, `hold_out` for `validation.fraction`, `epoch_items` and `BucketBatches`. What needs the
pixels is not known here: an image whose header reads but whose pixels do not is listed as kept, and training
reports it when the VAE first reads it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.config.data import DatasetConfig
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import PlannedImage, Size, _needs_upscale, plan_buckets
from lora_trainer.data.epochs import epoch_items
from lora_trainer.data.holdout import hold_out
from lora_trainer.data.masks import with_loss_masks
from lora_trainer.data.records import BadFile, Folder, scan_datasets
from lora_trainer.errors import UserError
from lora_trainer.fit.batches import BucketBatches

KEPT = "kept"
HELD_OUT = "held out for validation (validation.fraction)"


@dataclass(frozen=True)
class ImageRow:
    dataset_index: int
    name: str  # relative to its dataset's folder
    size: Size | None  # upright (height, width); None when the header cannot be read
    bucket: Size | None
    fate: str  # KEPT, "upscaled 1.60x", HELD_OUT, or "dropped: <why>"


@dataclass(frozen=True)
class BucketRow:
    bucket: Size  # (height, width)
    images: int  # distinct training images
    per_epoch: int  # items one epoch trains on: repeats and regularization counted
    batches: int  # global batches per epoch


@dataclass
class DataPlan:
    rows: list[ImageRow]
    folders: list[Folder]
    training: list[PlannedImage]  # what trains, after the hold-out
    held_out: list[PlannedImage]
    bad: list[BadFile]
    items_per_epoch: int
    batches_per_epoch: int
    buckets: list[BucketRow]
    validation_folder_images: int | None = None  # images of validation.path, when that is set
    stops_on_bad_files: bool = False  # data.on_bad_image: error and bad files: training would stop before its first step

    @property
    def has_training_images(self) -> bool:
        return any(not image.record.is_reg for image in self.training)  # the hold-out always leaves one


def plan_data(config: Config, processes: int = 1) -> DataPlan:
    """The fate of every image of `config.datasets` and the epoch's batches on `processes` processes."""
    scan = scan_datasets(config.datasets)
    planned, too_small = plan_buckets(with_loss_masks(scan.records, config.datasets), config.data)
    bad = scan.bad + too_small
    training, held_out = list(planned), []
    trainable = any(not image.record.is_reg for image in planned)
    if config.validation.fraction and trainable:
        training, held_out = hold_out(planned, config.validation.fraction, config.validation.seed)
    seed = config.training.seed
    epoch = epoch_items(training, seed)
    batches = BucketBatches([image.plan.bucket for image in epoch], config.training.batch_size, seed, processes)
    return DataPlan(
        rows=_rows(config.datasets, scan.folders, planned, held_out, bad, {record.image_path: record.size for record in scan.records}),
        folders=scan.folders,
        training=training,
        held_out=held_out,
        bad=bad,
        items_per_epoch=len(epoch),
        batches_per_epoch=len(batches),
        buckets=_bucket_rows(training, epoch, batches),
        validation_folder_images=_validation_folder_images(config),
        stops_on_bad_files=config.data.on_bad_image == "error" and bool(bad),
    )


def check_trainable(plan: DataPlan) -> None:
    """Training's own refusal when no training image is usable (regularization images alone teach nothing)."""
    if not plan.has_training_images:
        raise UserError(
            "no usable training images are left (see the dropped files above); every dataset entry with "
            "is_reg: false needs at least one readable image"
        )


def upscale_factor(image: PlannedImage) -> float | None:
    """How much the image is enlarged to cover its bucket, or None when it is not."""
    plan = image.plan
    if not _needs_upscale(plan.original, plan.bucket):
        return None
    return max(plan.resized[0] / plan.original[0], plan.resized[1] / plan.original[1])


def _rows(
    datasets: Sequence[DatasetConfig], folders: Sequence[Folder], planned: Sequence[PlannedImage], held_out: Sequence[PlannedImage],
    bad: Sequence[BadFile], sizes: dict[Path, Size],
) -> list[ImageRow]:
    held = {image.record.image_path for image in held_out}
    rows = []
    for image in planned:
        record = image.record
        factor = upscale_factor(image)
        fate = HELD_OUT if record.image_path in held else (f"upscaled {factor:.2f}x" if factor else KEPT)
        rows.append(ImageRow(record.dataset_index, _relative(record.image_path, datasets[record.dataset_index]), record.size, image.plan.bucket, fate))
    # A bad file (an image, or the caption that drops it) lies in one of the scanned folders.
    dataset_of_folder: dict[Path, int] = {}
    for folder in folders:
        dataset_of_folder.setdefault(folder.path, folder.dataset_index)
    for problem in bad:
        index = dataset_of_folder.get(problem.path.parent, 0)
        rows.append(ImageRow(index, _relative(problem.path, datasets[index]), sizes.get(problem.path), None, f"dropped: {problem.reason}"))
    return sorted(rows, key=lambda row: (row.dataset_index, row.name))


def _bucket_rows(training: Sequence[PlannedImage], epoch: Sequence[PlannedImage], batches: BucketBatches) -> list[BucketRow]:
    images = Counter(image.plan.bucket for image in training)
    per_epoch = Counter(image.plan.bucket for image in epoch)
    # The first epoch's batches as the loader makes them; every epoch has as many per bucket.
    per_bucket = Counter(epoch[batch[0]].plan.bucket for batch in batches.epoch_batches(1))
    return [
        BucketRow(bucket, images[bucket], per_epoch[bucket], per_bucket[bucket])
        for bucket in sorted(images, key=lambda size: (size[1] / size[0], size))
    ]


def _validation_folder_images(config: Config) -> int | None:
    if config.validation.path is None:
        return None
    scan = scan_datasets([DatasetConfig(path=config.validation.path)])
    planned, _ = plan_buckets(scan.records, config.data)
    return len(planned)


def _relative(path: Path, dataset: DatasetConfig) -> str:
    try:
        return str(path.relative_to(dataset.path))
    except ValueError:
        return str(path)


def format_image_table(plan: DataPlan, datasets: Sequence[DatasetConfig]) -> str:
    """Every image with its size, bucket and fate, under a heading per dataset; columns aligned across all of them."""
    name_width = max([len("image"), *(len(row.name) for row in plan.rows)])
    size_width = max([len("size"), *(len(_size(row.size)) for row in plan.rows)])
    bucket_width = max([len("bucket"), *(len(_size(row.bucket)) for row in plan.rows)])

    def line(name: str, size: str, bucket: str, fate: str) -> str:
        return f"    {name:<{name_width}}  {size:>{size_width}}  {bucket:>{bucket_width}}  {fate}".rstrip()

    kept = sum(1 for row in plan.rows if not row.fate.startswith(("dropped", "held out")))
    dropped = sum(1 for row in plan.rows if row.fate.startswith("dropped"))
    upscaled = sum(1 for row in plan.rows if row.fate.startswith("upscaled"))
    summary = (
        f"images: {len(plan.rows)} found, {kept} train ({upscaled} of them upscaled), {len(plan.held_out)} held out for "
        f"validation, {dropped} dropped"
    )
    lines = [summary]
    for index, dataset in enumerate(datasets):
        rows = [row for row in plan.rows if row.dataset_index == index]
        lines.append(f"  datasets.{index}: {_shown_path(dataset.path)} ({_dataset_summary(plan, index, len(rows), dataset)})")
        lines.append(line("image", "size", "bucket", "fate"))
        lines.extend(line(row.name, _size(row.size), _size(row.bucket), row.fate) for row in rows)
    return "\n".join(lines)


def format_bucket_summary(plan: DataPlan, global_batch: int) -> str:
    """One line per bucket: its images, the items an epoch takes from it and the batches they make."""
    header = ("bucket (w x h)", "aspect", "images", "per epoch", f"batches of {global_batch}")
    rows = [(_size(row.bucket), f"{row.bucket[1] / row.bucket[0]:.2f}", str(row.images), str(row.per_epoch), str(row.batches)) for row in plan.buckets]
    rows.append(("all", "", str(sum(row.images for row in plan.buckets)), str(plan.items_per_epoch), str(plan.batches_per_epoch)))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  " + "  ".join(f"{cell:>{width}}" for cell, width in zip(line, widths)) for line in (header, *rows)]
    extra = ""
    if plan.validation_folder_images is not None:
        extra = f"\n  validation: {plan.validation_folder_images} images from validation.path"
    elif plan.held_out:
        extra = f"\n  validation: {len(plan.held_out)} held-out images"
    return "buckets (repeats and regularization images counted per epoch):\n" + "\n".join(lines) + extra


def _dataset_summary(plan: DataPlan, index: int, count: int, dataset: DatasetConfig) -> str:
    folders = [folder for folder in plan.folders if folder.dataset_index == index]
    repeats = sorted({folder.repeats for folder in folders})
    if len(repeats) == 1:
        repeat_text = f"{repeats[0]} repeat{'s' * (repeats[0] != 1)}"
    else:
        repeat_text = "repeats " + ", ".join(f"{folder.path.name} {folder.repeats}" for folder in folders)
    kind = ", regularization" if dataset.is_reg else ""
    return f"{count} image{'s' * (count != 1)}{kind}, {repeat_text}"


def _size(size: Size | None) -> str:
    return "-" if size is None else f"{size[1]} x {size[0]}"


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
