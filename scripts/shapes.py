"""Coloured shapes on white: drawing them, and telling from a picture which colour and shape it shows.

Shared by the pretraining script of `builtin:shapes-sdxl`, the example dataset, and the tests that
check what the model draws. The classifier is deliberately simple and exact on clean renders:

- colour: the median hue of the clearly coloured pixels, matched to the nearest known hue;
- shape: the coloured pixels' bounding box, cut out and scaled to a square, compared with a filled
  circle, square and triangle of the same box (intersection over union); the best overlap wins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn 4x larger and scaled down, for smooth edges like a real image's
COLOURS = {
    "red": (215, 35, 35),
    "yellow": (235, 200, 25),
    "green": (35, 160, 55),
    "blue": (35, 65, 215),
    "cyan": (20, 190, 205),  # the example LoRA's new concept: the base model never sees it
}
BASE_COLOURS = ("red", "yellow", "green", "blue")
SHAPES = ("circle", "square", "triangle")
_TEMPLATE_SIZE = 32


@dataclass(frozen=True)
class Picture:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in pixels


def random_picture(rng: random.Random, colour: str, shape: str) -> Picture:
    side = rng.randint(20, 44)
    left, top = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
    return Picture(colour, shape, (left, top, left + side, top + side))


def render(picture: Picture, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """The picture on white; `fill` paints it in any colour instead of its named one."""
    big = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), "white")
    box = tuple(coordinate * SUPERSAMPLE for coordinate in picture.box)
    _draw_shape(ImageDraw.Draw(big), picture.shape, box, fill or COLOURS[picture.colour])
    return big.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: tuple[int, ...], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def classify(image: Image.Image) -> tuple[str | None, str | None]:
    """(colour, shape) of the picture; None for what cannot be told (e.g. no coloured pixels)."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    coloured = (hsv[..., 1] > 0.45) & (hsv[..., 2] > 0.35)
    if coloured.sum() < 12:
        return None, None
    return _colour_of(hsv[..., 0][coloured]), _shape_of(coloured)


def _colour_of(hues: np.ndarray) -> str:
    # Hue is circular (red sits at both ends): take the angle of the mean direction, not the mean number.
    angles = hues * 2 * np.pi
    hue = (np.arctan2(np.sin(angles).mean(), np.cos(angles).mean()) / (2 * np.pi)) % 1.0
    return min(COLOURS, key=lambda name: _hue_distance(hue, _hue_of(COLOURS[name])))


def _hue_of(rgb: tuple[int, int, int]) -> float:
    return Image.new("RGB", (1, 1), rgb).convert("HSV").getpixel((0, 0))[0] / 255.0


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def _shape_of(mask: np.ndarray) -> str:
    rows, columns = np.nonzero(mask)
    cut = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    scaled = np.asarray(Image.fromarray(cut.astype(np.uint8) * 255).resize((_TEMPLATE_SIZE, _TEMPLATE_SIZE))) > 127
    return max(SHAPES, key=lambda shape: _overlap(scaled, _TEMPLATES[shape]))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def _template(shape: str) -> np.ndarray:
    image = Image.new("L", (_TEMPLATE_SIZE, _TEMPLATE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(image), shape, (0, 0, _TEMPLATE_SIZE - 1, _TEMPLATE_SIZE - 1), 255)
    return np.asarray(image) > 127


_TEMPLATES = {shape: _template(shape) for shape in SHAPES}
