"""Generation parameters in a PNG's `parameters` text chunk, laid out as AUTOMATIC1111 writes them.

A1111, Forge and ComfyUI's image-info readers show this text, and pasting it into A1111's prompt box
fills in the prompt, LoRA tags and settings:

    a cat, sitting <lora:my_style:0.8>
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 1024x1024, ...
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_trainer import __version__
from lora_trainer.files import write_bytes_atomic
from lora_trainer.sampling.schedulers import a1111_label

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# A1111 reads <lora:NAME:WEIGHT> and splits it at ':', so a name can hold neither ':' nor '>'.
_TRAILING_LORA_TAG = re.compile(r"(?:^| )<lora:([^:<>]+):([^:<>]+)>\Z")


@dataclass(frozen=True)
class GenerationInfo:
    """What made one image; enough to generate it again."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # canonical name, see lora_trainer.config.samplers
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    loras: tuple[tuple[str, float], ...] = ()  # (file name without extension, weight)


def parameters_text(info: GenerationInfo) -> str:
    """The A1111 infotext: prompt with LoRA tags, optional negative prompt line, then the settings line."""
    _check_round_trips(info)
    lines = [_prompt_with_lora_tags(info.prompt, info.loras)]
    if info.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {info.negative_prompt}")
    lines.append(_settings_line(info))
    return "\n".join(lines)


def png_bytes(image: Image.Image, info: GenerationInfo) -> bytes:
    """`image` encoded as PNG with the generation parameters in its `parameters` chunk."""
    metadata = PngInfo()
    # Pillow writes tEXt, or iTXt when the text is not Latin-1; A1111's reader takes either.
    metadata.add_text(PARAMETERS_KEY, parameters_text(info))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata)
    return buffer.getvalue()


def save_png(path: Path, image: Image.Image, info: GenerationInfo) -> None:
    """Write `image` to `path` (atomically) as a PNG that carries `info`."""
    write_bytes_atomic(path, png_bytes(image, info))


def _check_round_trips(info: GenerationInfo) -> None:
    # Text that A1111's reader would split differently is refused here rather than written wrong.
    if any(line.startswith(NEGATIVE_PREFIX) for line in info.prompt.split("\n")):
        raise ValueError(f"a prompt line cannot start with {NEGATIVE_PREFIX!r}")
    if split_trailing_lora_tags(info.prompt)[1]:
        raise ValueError("the prompt ends with a <lora:...> tag; pass that LoRA in `loras` instead")
    for name, weight in info.loras:
        if not name or any(char in name for char in ":<>\n"):
            raise ValueError(f"LoRA name {name!r} cannot be written as a <lora:...> tag")
        if not math.isfinite(weight):
            raise ValueError(f"LoRA {name!r} has weight {weight}; it must be a finite number")


def _prompt_with_lora_tags(prompt: str, loras: tuple[tuple[str, float], ...]) -> str:
    tags = [f"<lora:{name}:{float(weight)!r}>" for name, weight in loras]
    return " ".join([prompt, *tags] if prompt else tags)


def split_trailing_lora_tags(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The prompt without the `<lora:NAME:WEIGHT>` tags at its end, and those LoRAs; a tag inside stays text."""
    loras: list[tuple[str, float]] = []
    while (match := _TRAILING_LORA_TAG.search(prompt)) and _is_number(match[2]):
        loras.insert(0, (match[1], float(match[2])))
        prompt = prompt[: match.start()]
    return prompt, tuple(loras)


def _settings_line(info: GenerationInfo) -> str:
    sampler, schedule_type = a1111_label(info.sampler)
    settings = {
        "Steps": str(info.steps),
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": repr(float(info.guidance_scale)),
        "Seed": str(info.seed),
        "Size": f"{info.width}x{info.height}",
        "Model": info.model or None,
        "Version": f"lora-train {__version__}",
    }
    return ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None)


def _quote(value: str) -> str:
    # A1111 quotes values holding ',' ':' or a newline as JSON; we also quote what its reader would
    # otherwise change: a leading quote, or spaces at either end.
    if any(char in value for char in ',:\n') or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
