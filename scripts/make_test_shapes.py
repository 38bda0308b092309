"""Draw the tests' mixed-shapes dataset in tests/data/mixed_shapes/: shapes of several sizes and aspect
ratios on three backgrounds, with captions.

    python scripts/make_test_shapes.py

Deterministic: running it again writes the same files. Sizes vary (some not square) so the
resize-and-crop path and SDXL's crop conditioning are exercised.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

TRIGGER = "lts_shapes"
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (240, 200, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((128, 128), (160, 128), (128, 192), (256, 256))


def draw(shape: str, color: tuple[int, int, int], background: tuple[int, int, int], size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    pen = ImageDraw.Draw(image)
    radius = rng.randint(min(size) // 4, min(size) // 3)
    center_x = width // 2 + rng.randint(-width // 10, width // 10)
    center_y = height // 2 + rng.randint(-height // 10, height // 10)
    box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
    if shape == "circle":
        pen.ellipse(box, fill=color)
    elif shape == "square":
        pen.rectangle(box, fill=color)
    else:
        pen.polygon([(center_x, center_y - radius), (center_x - radius, center_y + radius), (center_x + radius, center_y + radius)], fill=color)
    return image


def main(folder: Path = Path(__file__).resolve().parent.parent / "tests" / "data" / "mixed_shapes") -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(12):
        shape = SHAPES[index % len(SHAPES)]
        color_name = list(COLORS)[index % len(COLORS)]
        background_name = list(BACKGROUNDS)[(index // len(COLORS)) % len(BACKGROUNDS)]
        size = SIZES[index % len(SIZES)]
        image = draw(shape, COLORS[color_name], BACKGROUNDS[background_name], size, rng)
        stem = f"{index:02d}_{color_name}_{shape}"
        image.save(folder / f"{stem}.png", optimize=True)
        caption = f"{TRIGGER}, a {color_name} {shape}, {background_name} background"
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
