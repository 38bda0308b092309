"""What one epoch trains on: every training image `repeats` times, and as many regularization images."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from lora_trainer.data.records import ImageRecord


class _Recorded(Protocol):
    @property
    def record(self) -> ImageRecord: ...


Image = TypeVar("Image", bound=_Recorded)


def epoch_items(images: Sequence[Image], seed: int) -> list[Image]:
    """The epoch's images in order, before shuffling: training images repeated, then regularization images.

    As in kohya, regularization images never lengthen the epoch: their pool (each reg image `repeats`
    times) is shuffled once from the seed and cut, or cycled, to the number of training images.
    """
    training = [image for image in images if not image.record.is_reg for _ in range(image.record.repeats)]
    pool = [image for image in images if image.record.is_reg for _ in range(image.record.repeats)]
    if not pool:
        return training
    random.Random(f"regularization:{seed}").shuffle(pool)
    return training + [pool[index % len(pool)] for index in range(len(training))]
