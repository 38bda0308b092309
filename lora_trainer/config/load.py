"""Reading a config: YAML file -> `--set` overrides -> one validation; and writing the resolved config back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_trainer.config.messages import format_config_errors
from lora_trainer.config.overrides import apply_overrides
from lora_trainer.config.schema import Config
from lora_trainer.config.yaml_io import load_yaml
from lora_trainer.errors import ConfigError


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set key=value` overrides, and validate it; raise ConfigError if bad."""
    raw = read_yaml_mapping(path)
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> Config:
    """The typed config of a raw mapping; every problem in one ConfigError, a line each, prefixed by `source`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_config_errors(error, Config, source)) from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model:, datasets:, ...)")
    return raw


def dump_config(config: Config) -> str:
    """The config as YAML with every default filled in, as saved beside each LoRA."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
