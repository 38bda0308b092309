"""Aspect-ratio buckets: which size each image trains at, and how it is resized and cropped to get there.

Every bucket holds about resolution^2 pixels with both sides multiples of `step`, so images keep their
shape instead of being cut square. An image goes to the bucket whose aspect ratio is closest to its own
(compared as log ratios, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it, and cropped.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lora_trainer.config.data import DataConfig
from lora_trainer.data.epochs import epoch_items
from lora_trainer.data.records import BadFile, ImageRecord

Size = tuple[int, int]  # (height, width), as SDXL's time_ids order them


class ImageTooSmall(ValueError):
    pass


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a bucket-sized picture: resize to `resized`, cut `bucket` out at `crop_top_left`."""

    original: Size
    resized: Size
    bucket: Size
    crop_top_left: tuple[int, int]

    def with_crop(self, top: int, left: int) -> CropPlan:
        return CropPlan(self.original, self.resized, self.bucket, (top, left))

    def flipped(self) -> CropPlan:
        """The plan of the horizontally flipped image: the same window, seen from the other edge."""
        top, left = self.crop_top_left
        return self.with_crop(top, self.resized[1] - self.bucket[1] - left)


@dataclass(frozen=True)
class PlannedImage:
    """An image and the plan that cuts it to its bucket."""

    record: ImageRecord
    plan: CropPlan


def plan_buckets(records: Sequence[ImageRecord], data: DataConfig) -> tuple[list[PlannedImage], list[BadFile]]:
    """Every record with its bucket plan, and the images too small for any bucket."""
    buckets = bucket_sizes(data.resolution, data.bucket_step, data.smallest_side, data.largest_side)
    planned, too_small = [], []
    for record in records:
        try:
            planned.append(PlannedImage(record, plan_for(record.size, buckets, data)))
        except ImageTooSmall as error:
            too_small.append(BadFile(record.image_path, f"{error}; use a larger image or lower data.min_bucket_side"))
    return planned, too_small


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """All (height, width) with sides multiples of `step` in [min_side, max_side] and area in (res^2 - step*side, res^2].

    For each width the height is the largest multiple of `step` that keeps the area within resolution^2, so
    no bucket has more pixels than the square training size (memory stays as configured).
    """
    area = resolution * resolution
    sizes = set()
    for width in range(_round_up(min_side, step), max_side + 1, step):
        height = area // width // step * step
        if min_side <= height <= max_side:
            sizes.add((height, width))
            sizes.add((width, height))  # rounding differs by orientation; offer portrait and landscape alike
    sizes.add((resolution, resolution))
    return sorted(sizes, key=lambda size: (size[1] / size[0], size))


def plan_for(original: Size, buckets: list[Size], data: DataConfig) -> CropPlan:
    """The bucket and center crop for an image of `original` (height, width) pixels."""
    height, width = original
    if min(height, width) < data.smallest_side:
        raise ImageTooSmall(
            f"{width}x{height} is smaller than the smallest bucket side {data.smallest_side} (data.min_bucket_side)"
        )
    if not data.buckets:
        return _cover_and_center((data.resolution, data.resolution), original)
    bucket = nearest_bucket(original, buckets)
    if data.bucket_no_upscale and _needs_upscale(original, bucket):
        bucket = _own_size_bucket(original, data)
    return _cover_and_center(bucket, original)


def nearest_bucket(original: Size, buckets: list[Size]) -> Size:
    height, width = original
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda size: (abs(math.log(size[1] / size[0]) - log_ratio), size))


def random_crop(plan: CropPlan, rng: random.Random) -> CropPlan:
    """The same resize, with the bucket window placed anywhere inside the resized image."""
    spare_height = plan.resized[0] - plan.bucket[0]
    spare_width = plan.resized[1] - plan.bucket[1]
    return plan.with_crop(rng.randint(0, spare_height), rng.randint(0, spare_width))


def _needs_upscale(original: Size, bucket: Size) -> bool:
    return bucket[0] > original[0] or bucket[1] > original[1]


def _own_size_bucket(original: Size, data: DataConfig) -> Size:
    """A bucket of the image's own shape, shrunk to at most resolution^2 pixels, sides rounded down to the step."""
    height, width = original
    scale = min(1.0, math.sqrt(data.resolution**2 / (height * width)))
    step = data.bucket_step
    bucket_height = min(data.largest_side, int(height * scale) // step * step)
    bucket_width = min(data.largest_side, int(width * scale) // step * step)
    if bucket_height < step or bucket_width < step:
        raise ImageTooSmall(f"{width}x{height} is too small for a {step}-pixel bucket step without upscaling")
    return bucket_height, bucket_width


def _cover_and_center(bucket: Size, original: Size) -> CropPlan:
    """Scale so the image covers the bucket (keeping its aspect ratio), then center the bucket window."""
    height, width = original
    scale = max(bucket[0] / height, bucket[1] / width)
    resized = (max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale)))
    top = (resized[0] - bucket[0]) // 2
    left = (resized[1] - bucket[1]) // 2
    return CropPlan(original, resized, bucket, (top, left))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def bucket_table(images: Sequence[PlannedImage], seed: int) -> str:
    """Buckets by size with their image count and how many of them one epoch trains on (repeats and reg)."""
    counts = Counter(image.plan.bucket for image in images)
    per_epoch = Counter(image.plan.bucket for image in epoch_items(images, seed))
    lines = [f"{'bucket (w x h)':>16}  {'aspect':>6}  {'images':>6}  {'per epoch':>9}"]
    for height, width in sorted(counts, key=lambda size: size[1] / size[0]):
        lines.append(f"{f'{width} x {height}':>16}  {width / height:6.2f}  {counts[(height, width)]:6d}  {per_epoch[(height, width)]:9d}")
    return "\n".join(lines)
