"""Read an image and fit it to the training size: resize the shorter side, then center-crop.

The crop is remembered because SDXL conditions on it (`time_ids`: original size, crop top-left,
target size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.errors import UserError

BACKGROUND = (255, 255, 255)  # transparent pixels are flattened onto white


@dataclass(frozen=True)
class CropInfo:
    """SDXL's micro-conditioning for one image; sizes are (height, width), the crop is (top, left)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def load_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB, transparency flattened onto white."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: cannot read this image ({error}); fix or remove the file") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, BACKGROUND)
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    return image.convert("RGB")


def resize_and_center_crop(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, CropInfo]:
    """Scale so the image covers `size` (height, width), then cut the centered `size` window out."""
    target_height, target_width = size
    width, height = image.size
    scale = max(target_width / width, target_height / height)
    resized_width = max(target_width, round(width * scale))
    resized_height = max(target_height, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), Image.Resampling.LANCZOS)
    top = (resized_height - target_height) // 2
    left = (resized_width - target_width) // 2
    cropped = image.crop((left, top, left + target_width, top + target_height))
    return cropped, CropInfo((height, width), (top, left), (target_height, target_width))


def to_model_input(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
