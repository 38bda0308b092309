"""Whether a config may continue a saved state: anything that changes the math is refused, by field name.

Allowed to change: how often and what is saved, the sample images, how the data is read (workers, cache
folder), how often validation runs, and the step or epoch budget (the learning-rate schedule is then
recomputed over the new total, which `train` says in one line). The per-device batch may change with
the number of processes as long as the global batch stays the same. The EMA of the adapters may move to
or from the CPU (`training.ema.on_cpu`); its other settings change the LoRA the run saves.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from lora_trainer.config.schema import Config
from lora_trainer.errors import UserError
from lora_trainer.fit.state import SavedState

# Fields (or whole sections, ending in ".") that do not change what the adapters learn.
FREE_TO_CHANGE = (
    "output.dir", "output.save_every_n_epochs", "output.save_every_n_steps", "output.keep_saves",
    "output.save_state_every_n_steps", "output.save_state_every_n_epochs", "output.keep_states",
    "output.state_save_failure", "output.save_dtype", "sample.", "data.workers", "data.cache_dir",
    "data.vae_batch_size", "data.on_bad_image", "validation.every_n_epochs", "model.allow_pickle",
    "training.epochs", "training.max_steps", "training.batch_size",
    "training.ema.on_cpu",  # where the average is kept, not what it computes
)


def check_resumable(config: Config, saved: SavedState, num_processes: int) -> None:
    """Raise a UserError naming every field whose change would make the resumed run differ from the saved one."""
    before = _saved_settings(saved.config_text)
    after = _flatten(config.model_dump(mode="json"))
    changed = [
        f"{key} ({_show(before.get(key))} -> {_show(after.get(key))})"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and not key.startswith(FREE_TO_CHANGE)
    ]
    global_batch = config.training.batch_size * num_processes
    if global_batch != saved.global_batch_size:
        changed.append(
            f"the global batch (training.batch_size x processes: {config.training.batch_size} x {num_processes} = "
            f"{global_batch}; the state's is {saved.global_batch_size})"
        )
    if changed:
        raise UserError(
            f"--resume {saved.folder}: this config changes what the run computes, in {'; '.join(changed)}; "
            "put those back to resume, or start a new run (another output.dir, or --overwrite)"
        )


def check_same_data(fingerprint: str, saved: SavedState) -> None:
    if fingerprint != saved.data_fingerprint:
        raise UserError(
            f"--resume {saved.folder}: the training images or captions changed since this state was saved (images added, "
            "removed or edited, captions or repeats changed); put the dataset back, or start a new run"
        )


def _saved_settings(config_text: str) -> dict[str, Any]:
    """The state's config with today's defaults filled in, so that a field added since the state was saved, left at
    its default, is no change; as written when it no longer parses (a dataset folder moved, say)."""
    raw = yaml.safe_load(config_text)
    try:
        return _flatten(Config.model_validate(raw).model_dump(mode="json"))
    except ValidationError:
        return _flatten(raw)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, child in value.items():
            flat.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        flat = {f"{prefix}.count": len(value)}
        for index, child in enumerate(value):
            flat.update(_flatten(child, f"{prefix}.{index}"))
        return flat
    return {prefix: value}


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)
