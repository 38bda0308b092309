"""Holding out a seeded share of the training images, to measure a validation loss on pictures training never sees."""

from __future__ import annotations

import random
from collections.abc import Sequence

from lora_trainer.data.epochs import Image
from lora_trainer.errors import UserError


def hold_out(images: Sequence[Image], fraction: float, seed: int) -> tuple[list[Image], list[Image]]:
    """(images to train on, held-out images): a seeded `fraction` of the training images (never regularization ones)."""
    candidates = [index for index, image in enumerate(images) if not image.record.is_reg]
    count = max(1, round(len(candidates) * fraction))
    if count >= len(candidates):
        raise UserError(
            f"validation.fraction: holding out {count} of {len(candidates)} training images leaves none to train on; "
            "lower it or give validation.path"
        )
    chosen = set(random.Random(f"validation:{seed}").sample(candidates, count))
    kept = [image for index, image in enumerate(images) if index not in chosen]
    return kept, [images[index] for index in sorted(chosen)]
