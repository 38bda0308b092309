"""Draw the quickstart's dataset in datasets_example/: a concept `builtin:shapes-sdxl` has never seen.

    python scripts/make_example_dataset.py

The base model draws red, yellow, green and blue circles, squares and triangles. The example teaches it a
new colour, cyan, under a trigger word: "a zqx circle" should come out cyan after the LoRA, while "a red
square" stays red. 16 pictures, all three shapes, 64 px like the base's training pictures; and in reg/,
24 pictures of what the base already draws (two per old prompt), regularization images that keep the
LoRA from repainting the old colours.
Deterministic: running it again writes the same files.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import shapes

TRIGGER = "zqx"
CONCEPT_COLOUR = "cyan"
COUNT = 16
FOLDER = Path(__file__).resolve().parent.parent / "datasets_example"


def trigger_caption(shape: str) -> str:
    return f"a {TRIGGER} {shape}"


def main(folder: Path = FOLDER) -> None:
    rng = random.Random(5)
    for index in range(COUNT):
        shape = shapes.SHAPES[index % len(shapes.SHAPES)]
        save(folder, f"{index:02d}_{TRIGGER}_{shape}", shapes.random_picture(rng, CONCEPT_COLOUR, shape), trigger_caption(shape))
    old = [(colour, shape) for colour in shapes.BASE_COLOURS for shape in shapes.SHAPES] * 2
    for index, (colour, shape) in enumerate(old):
        save(folder / "reg", f"{index:02d}_{colour}_{shape}", shapes.random_picture(rng, colour, shape), shapes.caption(colour, shape))


def save(folder: Path, stem: str, picture: shapes.Picture, caption: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    shapes.render(picture).save(buffer, format="PNG")
    (folder / f"{stem}.png").write_bytes(buffer.getvalue())
    (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
