"""The benchmark's images: coloured shapes on plain backgrounds, with a caption file each and a diffusers
`metadata.jsonl` beside them, so lora-train, kohya (folder + .txt) and diffusers' scripts (imagefolder) read
the same folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def write_dataset(folder: Path, resolution: int, count: int = 16) -> Path:
    from PIL import Image, ImageDraw

    if (folder / "metadata.jsonl").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for index in range(count):
        colour, background = rng.sample(sorted(COLOURS), 2)
        image = Image.new("RGB", (resolution, resolution), COLOURS[background])
        margin = rng.randint(resolution // 8, resolution // 3)
        ImageDraw.Draw(image).ellipse((margin, margin, resolution - margin, resolution - margin), fill=COLOURS[colour])
        name = f"{index:03d}.png"
        caption = f"a {colour} circle on {background}"
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
