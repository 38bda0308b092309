"""The per-block learning-rate weights of SDXL's UNet as the config takes them (kohya's `down_lr_weight`,
`mid_lr_weight`, `up_lr_weight`): how many blocks each covers, kohya's named curves, and the checks.

The 23 blocks themselves (which module is in which) are `model.blocks`; the counts are here so that a config
error needs no model code.
"""

from __future__ import annotations

import math
import re
from typing import Any

BLOCK_COUNT = 23
BASE_BLOCK = 0
INPUT_BLOCKS = 9
MIDDLE_BLOCKS = 3
OUTPUT_BLOCKS = 9
OUT_BLOCK = 22
FIRST_INPUT_BLOCK, FIRST_MIDDLE_BLOCK, FIRST_OUTPUT_BLOCK = 1, 10, 13

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_PRESET = re.compile(r"^(sine|cosine|linear|reverse_linear|zeros)(?:\+(\d+(?:\.\d*)?|\.\d+))?$")


def preset_weights(preset: str, count: int) -> list[float]:
    """kohya's named curves over `count` blocks (`get_block_lr_weight`), `+x` added to every value:
    `sine` rises 0 -> 1 as sin(pi/2 * t), `cosine` falls 1 -> 0 as cos(pi/2 * t), `linear` rises as t,
    `reverse_linear` falls as 1 - t, `zeros` is 0; t = k / (count - 1) for block k."""
    match = _PRESET.match(preset)
    if match is None:
        raise ValueError(f"unknown preset {preset!r}")
    name, offset = match.group(1), float(match.group(2) or 0)
    curves = {
        "sine": lambda t: math.sin(math.pi / 2 * t),
        "cosine": lambda t: math.cos(math.pi / 2 * t),
        "linear": lambda t: t,
        "reverse_linear": lambda t: 1 - t,
        "zeros": lambda t: 0.0,
    }
    return [curves[name](k / (count - 1)) + offset for k in range(count)]


def parse_block_weights(value: Any, count: int, presets: bool) -> list[float] | str | None:
    """A `*_lr_weight` setting as written (a list of `count` weights, kohya's comma-separated string, or, if
    `presets`, a preset name), checked: a list of floats, or the preset's name. Raises ValueError."""
    what = f"{count} weights, 0 or more" + (f", or a preset ({', '.join(PRESETS)}, optionally +x, e.g. cosine+.25)" if presets else "")
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if presets and _PRESET.match(text):
            return text
        if "," not in text:
            raise ValueError(f"unknown preset {text!r}; give {what}" if presets else f"must be a list of {what}, got {text!r}")
        value = text.split(",")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of {what}, got {value!r}")
    weights = [_weight(item, what) for item in value]
    if len(weights) != count:
        raise ValueError(f"needs {count} weights (one per block), got {len(weights)}")
    negative = [weight for weight in weights if weight < 0]
    if negative:
        raise ValueError(f"weights must be 0 or more (0 leaves a block untrained), got {negative[0]}")
    return weights


def _weight(item: Any, what: str) -> float:
    if isinstance(item, bool):
        raise ValueError(f"must be {what}, got {item!r}")
    try:
        weight = float(item)
    except (TypeError, ValueError):
        raise ValueError(f"must be {what}, got {item!r}") from None
    if not math.isfinite(weight):
        raise ValueError(f"must be {what}, got {item!r}")
    return weight
