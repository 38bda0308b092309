"""Read an image upright in RGB and cut it to its bucket as a `CropPlan` says; turn it into VAE input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.data.buckets import CropPlan

WHITE = (255, 255, 255)


class UnreadableImage(Exception):
    """The file's pixels cannot be decoded (broken, truncated, not an image); the message says why."""


def load_rgb(path: Path, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB, transparency flattened onto `background`."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"cannot read this image ({error})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, tuple(background))
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    return image.convert("RGB")


def apply_plan(image: Image.Image, plan: CropPlan, flip: bool = False) -> Image.Image:
    """Resize to the plan's size, cut its bucket window out, and mirror the result if asked."""
    resized_height, resized_width = plan.resized
    if image.size != (resized_width, resized_height):
        image = image.resize((resized_width, resized_height), Image.Resampling.LANCZOS)
    top, left = plan.crop_top_left
    bucket_height, bucket_width = plan.bucket
    cropped = image.crop((left, top, left + bucket_width, top + bucket_height))
    return ImageOps.mirror(cropped) if flip else cropped


def to_model_input(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
