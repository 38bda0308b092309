"""Sample prompts, one per line, with kohya sd-scripts' inline options (`a cat --n blurry --w 832 --d 42`).

Options: --n negative prompt, --w width, --h height, --d seed, --l guidance scale, --s steps, --ss sampler.
An option starts at `--` after a space; a value or prompt in double quotes keeps ` --` as text.
"""

from __future__ import annotations

import codecs
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lora_trainer.config.samplers import canonical_sampler
from lora_trainer.errors import ConfigError

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
_WHOLE_NUMBER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class PromptSpec:
    """One image to generate; None means "use the default" (see `filled`)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None  # canonical name, see lora_trainer.config.samplers

    def filled(self, defaults: PromptSpec) -> PromptSpec:
        """This spec with every unset field taken from `defaults`."""
        unset = {field.name: getattr(defaults, field.name) for field in fields(self) if getattr(self, field.name) is None}
        return replace(self, **unset)


def gather_prompts(lines: list[str], prompts_file: Path | None, label: str, defaults: PromptSpec) -> list[PromptSpec]:
    """The prompt lines (errors name `label N`) then the file's prompts, each with `defaults` filled in."""
    specs = [parse_prompt_line(line, f"{label} {index + 1}") for index, line in enumerate(lines)]
    if prompts_file is not None:
        specs += read_prompts_file(prompts_file)
    return [spec.filled(defaults) for spec in specs]


def read_prompts_file(path: Path) -> list[PromptSpec]:
    """The prompts in a UTF-8 text file; blank lines and lines starting with '#' are skipped."""
    text = _read_text(path)
    specs = [parse_prompt_line(line, f"{path}:{number}") for number, line in _prompt_lines(text)]
    if not specs:
        raise ConfigError(f"{path}: the prompts file has no prompts; write one prompt per line")
    return specs


def parse_prompt_line(line: str, where: str) -> PromptSpec:
    """One prompt line; `where` (like `prompts.txt:7`) starts every error message."""
    prompt_piece, *option_pieces = _split_at_options(line, where)
    prompt = _unquote(prompt_piece.strip())
    if not prompt:
        raise ConfigError(f"{where}: the prompt is empty; write the prompt text before the first --option")
    values: dict[str, Any] = {}
    for piece in option_pieces:
        name, value = _option_name_and_value(piece, where)
        field, parse = _OPTIONS[name]
        if field in values:
            raise ConfigError(f"{where}: --{name} is given twice; keep one")
        try:
            values[field] = parse(_unquote(value))
        except ValueError as error:
            raise ConfigError(f"{where}: --{name} {value}: {error}") from None
    return PromptSpec(prompt, **values)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: prompts file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the path of a prompts text file") from None
    # Windows editors often start UTF-8 files with a byte-order mark; it is not part of the first prompt.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the prompts file is not UTF-8 text; save it as UTF-8") from None


def _prompt_lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only, so line numbers match what editors show (str.splitlines also splits on \v, \f, ...).
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, line.rstrip("\r")


def _split_at_options(line: str, where: str) -> list[str]:
    """The prompt, then one `--name value` piece per option; quoted text never starts an option."""
    pieces = []
    start = 0
    in_quotes = False
    for index, char in enumerate(line):
        if char == '"':
            in_quotes = not in_quotes
        elif not in_quotes and line.startswith("--", index) and (index == 0 or line[index - 1].isspace()):
            pieces.append(line[start:index])
            start = index
    if in_quotes:
        raise ConfigError(f'{where}: a double quote (") is not closed; close it or remove it')
    pieces.append(line[start:])
    return pieces


def _option_name_and_value(piece: str, where: str) -> tuple[str, str]:
    after_dashes = piece[2:]
    raw_name = re.match(r"\S*", after_dashes).group()
    name, value = raw_name.lower(), after_dashes[len(raw_name) :].strip()
    if not name:
        raise ConfigError(f"{where}: '--' without an option name; known options: {_known_options()}; quote text that contains ' --'")
    if name not in _OPTIONS:
        raise ConfigError(f"{where}: unknown option --{name}; known options: {_known_options()}")
    if not value:
        raise ConfigError(f"{where}: --{name} has no value; write it after the option, like --{name} {_EXAMPLES[name]}")
    return name, value


def _unquote(text: str) -> str:
    # Only a value wrapped in one pair of quotes loses them; quotes inside a prompt are prompt text.
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        return text[1:-1]
    return text


def _size(value: str) -> int:
    if not _WHOLE_NUMBER.fullmatch(value) or int(value) < 8 or int(value) % 8:
        raise ValueError("width and height must be positive multiples of 8, like 1024")
    return int(value)


def _seed(value: str) -> int:
    if not _WHOLE_NUMBER.fullmatch(value) or int(value) > _MAX_SEED:
        raise ValueError(f"the seed must be a whole number from 0 to {_MAX_SEED}")
    return int(value)


def _steps(value: str) -> int:
    if not _WHOLE_NUMBER.fullmatch(value) or int(value) < 1:
        raise ValueError("steps must be a whole number of at least 1, like 30")
    return int(value)


def _guidance_scale(value: str) -> float:
    if not _DECIMAL.fullmatch(value) or not math.isfinite(float(value)):
        raise ValueError("the guidance scale must be a number, like 7 or 5.5")
    if float(value) < 0:
        raise ValueError("the guidance scale must not be negative; use 0 or more, like 7")
    return float(value)


def _text(value: str) -> str:
    return value


# Option -> (PromptSpec field, parser that raises ValueError with what is allowed).
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", _text),
    "w": ("width", _size),
    "h": ("height", _size),
    "d": ("seed", _seed),
    "l": ("guidance_scale", _guidance_scale),
    "s": ("steps", _steps),
    "ss": ("sampler", canonical_sampler),
}
_EXAMPLES = {"n": '"blurry, lowres"', "w": "1024", "h": "1024", "d": "42", "l": "7", "s": "30", "ss": "euler_a"}


def _known_options() -> str:
    return " ".join(f"--{name}" for name in _OPTIONS)
