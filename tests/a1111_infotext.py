"""A reader of AUTOMATIC1111's infotext, to check that the PNGs we write read back as we meant them.

The product only writes this text; reading it is the tests' job, as A1111's own "PNG Info" reader would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lora_trainer.config.samplers import canonical_sampler
from lora_trainer.sampling.png_info import NEGATIVE_PREFIX, PARAMETERS_KEY, GenerationInfo, split_trailing_lora_tags

# One `Key: value` of the settings line; a value in double quotes is JSON and may hold commas.
_SETTING = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|\Z)')
_SIZE = re.compile(r"([0-9]+)x([0-9]+)")
_KARRAS_VARIANTS = {"dpm++_2m": "dpm++_2m_karras", "dpm++_2m_karras": "dpm++_2m_karras"}
_PLAIN_SCHEDULES = ("automatic", "uniform")


def parse_parameters(text: str) -> GenerationInfo:
    """The inverse of `parameters_text`; also reads these fields from text A1111 wrote. ValueError if one is missing."""
    *body, settings_line = text.split("\n")
    negative_start = next((index for index, line in enumerate(body) if line.startswith(NEGATIVE_PREFIX)), len(body))
    prompt, loras = split_trailing_lora_tags("\n".join(body[:negative_start]))
    negative = "\n".join(body[negative_start:])[len(NEGATIVE_PREFIX) :].removeprefix(" ")
    settings = _parse_settings(settings_line)
    width, height = _parse_size(_required(settings, "Size"))
    return GenerationInfo(
        prompt=prompt,
        negative_prompt=negative,
        steps=_whole_number(settings, "Steps"),
        sampler=sampler_from_a1111(_required(settings, "Sampler"), settings.get("Schedule type")),
        guidance_scale=_decimal(settings, "CFG scale"),
        seed=_whole_number(settings, "Seed"),
        width=width,
        height=height,
        model=settings.get("Model", ""),
        loras=loras,
    )


def read_generation_info(path: Path) -> GenerationInfo:
    """The generation parameters stored in the PNG at `path`; ValueError if it has none."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"{path}: not a PNG image")
            # .text, unlike .info, also holds chunks written after the image data.
            text = image.text.get(PARAMETERS_KEY)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a PNG image") from None
    if text is None:
        raise ValueError(f"{path}: the PNG has no {PARAMETERS_KEY!r} text chunk")
    try:
        return parse_parameters(str(text))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def sampler_from_a1111(label: str, schedule_type: str | None) -> str:
    """The canonical name for an A1111 "Sampler" label and "Schedule type"; the inverse of `a1111_label`.

    A label without a schedule type reads as the plain sampler, which is what A1111 before 1.9 meant by it
    (it wrote Karras into the label: "DPM++ 2M Karras").
    """
    sampler = canonical_sampler(label)
    schedule = (schedule_type or "Automatic").strip().lower()
    if schedule in _PLAIN_SCHEDULES:
        return sampler
    if schedule == "karras" and sampler in _KARRAS_VARIANTS:
        return _KARRAS_VARIANTS[sampler]
    raise ValueError(f"unknown sampler {label!r} with schedule type {schedule_type!r}")


def _parse_settings(line: str) -> dict[str, str]:
    settings = {}
    for match in _SETTING.finditer(line):
        key, value = match[1].strip(), match[2].strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # A1111 keeps such a value as written, and so do we
        settings[key] = value
    return settings


def _required(settings: dict[str, str], key: str) -> str:
    if key not in settings:
        raise ValueError(f"generation parameters have no {key!r} setting")
    return settings[key]


def _whole_number(settings: dict[str, str], key: str) -> int:
    value = _required(settings, key)
    if not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError(f"generation parameters: {key} {value!r} is not a whole number")
    return int(value)


def _decimal(settings: dict[str, str], key: str) -> float:
    value = _required(settings, key)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"generation parameters: {key} {value!r} is not a number") from None


def _parse_size(value: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"generation parameters: Size {value!r} is not WIDTHxHEIGHT")
    return int(match[1]), int(match[2])
