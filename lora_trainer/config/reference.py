"""Render the config reference (docs/config.md) from the field docstrings of the config sections.

    python -m lora_trainer.config.reference > docs/config.md

A test keeps the committed file equal to this output, so the reference cannot drift from the code.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lora_trainer.config.schema import Config

INTRO = """# Config reference

Every field of a `lora-train` YAML config, its default and what it does. Unknown fields are errors.
Override any field from the command line with `--set section.field=value`; list entries are
addressed by index: `--set datasets.0.repeats=5`. Relative paths are relative to the folder you
run `lora-train` from.

This file is generated from the code: `python -m lora_trainer.config.reference > docs/config.md`.
"""


def render() -> str:
    lines = [INTRO]
    for name, field in Config.model_fields.items():
        is_list = typing.get_origin(field.annotation) is list
        heading = f"{name}[N]" if is_list else name
        required = " (required)" if field.is_required() else ""
        lines += _section(heading, required, field.description, _model_in(field.annotation))
    return "\n".join(lines)


def _section(heading: str, required: str, description: str | None, section: type[BaseModel]) -> list[str]:
    """A section's table, followed by one of its own for each sub-section (e.g. `training.ema`)."""
    lines = [f"## `{heading}`{required}", "", _one_line(description), ""]
    lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for child_name, child in section.model_fields.items():
        if isinstance(child.annotation, type) and issubclass(child.annotation, BaseModel):
            nested.append((child_name, child))
            lines.append(f"| `{child_name}` | section | | {_one_line(child.description)} See `{heading}.{child_name}` below. |")
            continue
        default = "required" if child.is_required() else _show(child.default)
        lines.append(f"| `{child_name}` | {_type_name(child.annotation)} | {default} | {_one_line(child.description)} |")
    lines.append("")
    for child_name, child in nested:
        lines += _section(f"{heading}.{child_name}", "", child.description, child.annotation)
    return lines


def _model_in(annotation: Any) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel))


def _type_name(annotation: Any) -> str:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in arguments)
    if arguments and type(None) in arguments:
        others = [arg for arg in arguments if arg is not type(None)]
        return " or ".join(_type_name(arg) for arg in others) + " or null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in arguments)
    if origin is tuple:
        return "list of " + ", ".join(_type_name(arg) for arg in arguments)
    names = {int: "integer", float: "number", bool: "true/false", str: "text"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation)).replace("PosixPath", "path").replace("Path", "path")


def _show(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


if __name__ == "__main__":
    print(render(), end="")
