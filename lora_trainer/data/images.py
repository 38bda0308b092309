"""Read an image upright in RGB and cut it to its bucket as a `CropPlan` says; turn it into VAE input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.data.buckets import CropPlan, Size
from lora_trainer.data.records import ImageTooLarge, open_image, turns_sideways

WHITE = (255, 255, 255)
# JPEGs with more pixels than this are decoded at reduced scale when the caller says what size it needs:
# decoding 100+ megapixels only to shrink them to about one costs seconds and gigabytes. Smaller ones are
# decoded in full, so ordinary photos train on exactly the pixels they always did.
DRAFT_ABOVE_PIXELS = 100_000_000
_DRAFT_FORMATS = {"JPEG", "MPO"}  # MPO: a JPEG with extra frames (a phone's depth map), decoded the same way


class UnreadableImage(Exception):
    """The file's pixels cannot be decoded (broken, truncated, not an image); the message says why."""


def load_rgb(path: Path, background: tuple[int, int, int] = WHITE, size: Size | None = None) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB, transparency flattened onto `background`.

    With `size` (height, width: the plan's `resized`) it comes resized to exactly that, as `apply_plan` would
    resize it, and a very large JPEG is decoded at 1/2, 1/4 or 1/8 scale on the way, never below `size`.
    """
    try:
        with open_image(path) as opened:
            if size is not None and _worth_a_draft(opened):
                return to_rgb(_drafted(opened, size), background)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except ImageTooLarge as error:
        raise UnreadableImage(str(error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"cannot read this image ({error})") from None
    rgb = to_rgb(image, background)
    return rgb if size is None else _resized(rgb, size)


def _worth_a_draft(image: Image.Image) -> bool:
    return image.format in _DRAFT_FORMATS and image.width * image.height > DRAFT_ABOVE_PIXELS


def _drafted(opened: Image.Image, size: Size) -> Image.Image:
    """The JPEG decoded at the smallest scale that still covers `size`, resized to it, then turned upright.

    The resize happens before turning upright because only there does the decoder's box say exactly which
    part of the reduced picture is the original image (its last row and column may be partly padding);
    resizing that box keeps every pixel where a full-size decode would put it.
    """
    height, width = size
    stored = (height, width) if turns_sideways(opened) else (width, height)  # PIL order, as stored on disk
    drafted = opened.draft(None, stored)
    box = drafted[1] if drafted else None
    opened.load()
    return ImageOps.exif_transpose(opened.resize(stored, Image.Resampling.LANCZOS, box=box))


def _resized(image: Image.Image, size: Size) -> Image.Image:
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """RGB, from any mode Pillow decodes our formats to; `UnreadableImage` for float pixels."""
    if image.mode == "F":
        # No format we read stores floats, and their range (0-1? 0-255?) is anyone's guess.
        raise UnreadableImage(
            "its pixels are 32-bit floats (mode F), which is not supported; save it as an 8- or 16-bit PNG"
        )
    if image.mode.startswith("I"):
        image = sixteen_to_eight_bits(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, tuple(background))
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    return image.convert("RGB")


def sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image ("I;16", "I;16B", or "I" as Pillow reads some 16-bit files) as 8-bit "L".

    Pillow's own conversion clips every value above 255 to white; this maps 0..65535 onto 0..255 as
    value / 257, rounded. Values of an "I" image outside 0..65535 are clipped to it.
    """
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    values *= 2
    values += 257
    values //= 514  # round(v / 257) == floor((2v + 257) / 514), in integers
    return Image.fromarray(values.astype(np.uint8))


def apply_plan(image: Image.Image, plan: CropPlan, flip: bool = False) -> Image.Image:
    """Resize to the plan's size, cut its bucket window out, and mirror the result if asked."""
    image = _resized(image, plan.resized)
    top, left = plan.crop_top_left
    bucket_height, bucket_width = plan.bucket
    cropped = image.crop((left, top, left + bucket_width, top + bucket_height))
    return ImageOps.mirror(cropped) if flip else cropped


def to_model_input(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
