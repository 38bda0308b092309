"""The loss curve as a PNG beside the LoRA, for a glance without starting TensorBoard."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from lora_trainer.files import write_bytes_atomic

WIDTH, HEIGHT, MARGIN = 800, 400, 56
RAW_COLOR, SMOOTH_COLOR, AXIS_COLOR = (190, 205, 235), (25, 80, 200), (60, 60, 60)


def write_loss_curve(path: Path, losses: Sequence[float], title: str) -> None:
    """Per-step loss (light) and its exponential moving average (dark) against the step."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    pen = ImageDraw.Draw(image)
    pen.text((MARGIN, 16), title, fill=AXIS_COLOR)
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 24, HEIGHT - MARGIN
    pen.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS_COLOR)
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def point(index: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (index / max(len(losses) - 1, 1))
            return x, bottom - (bottom - top) * (value - low) / span

        pen.line([point(i, v) for i, v in enumerate(losses)], fill=RAW_COLOR, width=1)
        pen.line([point(i, v) for i, v in enumerate(moving_average(losses))], fill=SMOOTH_COLOR, width=2)
        pen.text((4, top - 6), f"{high:.4g}", fill=AXIS_COLOR)
        pen.text((4, bottom - 6), f"{low:.4g}", fill=AXIS_COLOR)
        pen.text((right - 70, bottom + 8), f"step {len(losses)}", fill=AXIS_COLOR)
    pen.text((left, bottom + 8), "loss per step (light), moving average (dark)", fill=AXIS_COLOR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def moving_average(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, so the first points are not pulled toward zero."""
    averaged, running = [], 0.0
    for count, value in enumerate(values, start=1):
        running = smoothing * running + (1 - smoothing) * value
        averaged.append(running / (1 - smoothing**count))
    return averaged
