"""`--set section.field=value` overrides, applied to the raw YAML mapping before validation.

Values are parsed as YAML (`8`, `1e-4`, `true`, `[0.9, 0.99]`, `null`), so they arrive with the same
types as in the file. A number in the path picks a list entry: `datasets.0.repeats=5`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from lora_trainer.config.yaml_io import load_yaml
from lora_trainer.errors import ConfigError


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.path=value` override set."""
    result = copy.deepcopy(raw)
    for override in overrides:
        path, value = parse_override(override)
        _set_path(result, path, value, override)
    return result


def parse_override(override: str) -> tuple[list[str], Any]:
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(f"--set {override!r}: expected section.field=value, e.g. --set network.rank=16")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"--set {override!r}: empty name in {key!r}; write section.field=value")
    try:
        value = load_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the plain text, validation says if it is wrong
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        value = text  # `name=my lora: v2` is text with a colon, not a mapping
    return parts, value


def _set_path(node: Any, path: list[str], value: Any, override: str) -> None:
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            index = _list_index(part, node, where, override)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # absent, or an empty section in the YAML
                    node[part] = {}
                node = node[part]
        else:
            parent = ".".join(path[:depth])
            raise ConfigError(f"--set {override!r}: {parent} is a single value, not a section with fields")


def _list_index(part: str, node: list[Any], where: str, override: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"--set {override!r}: {where} must be a list index (0, 1, ...) here")
    index = int(part)
    if index >= len(node):
        parent = where.rsplit(".", 1)[0]
        raise ConfigError(
            f"--set {override!r}: {parent} has {len(node)} {'entry' if len(node) == 1 else 'entries'}, "
            f"so the index must be 0..{len(node) - 1}"
        )
    return index
