"""The run's Accelerator: mixed precision, gradient accumulation, processes, and the TensorBoard tracker."""

from __future__ import annotations

import os
from typing import Any

from lora_trainer.config.schema import Config
from lora_trainer.errors import UserError
from lora_trainer.model.precision import resolve_mixed_precision


def start_accelerator(config: Config) -> tuple[Config, Any]:
    """The Accelerator for this run, and the config with `mixed_precision: auto` resolved."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    if not is_tensorboard_available():
        raise UserError("TensorBoard is not installed, so no training curves would be logged; pip install tensorboard")
    mixed_precision = resolve_mixed_precision(config.training.mixed_precision)
    config = config.model_copy(update={"training": config.training.model_copy(update={"mixed_precision": mixed_precision})})
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(config.output.dir), logging_dir=str(config.output.dir / "logs")),
    )
    return config, accelerator


def is_first_process() -> bool:
    """Whether this is the run's main process, from the launcher's environment (torchrun, accelerate launch,
    MPI), before the Accelerator exists: creating Accelerate's state early would fix it without the
    launch's `cpu` setting."""
    for variable in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return True


def start_trackers(accelerator: Any, config: Config, purge_step: int | None = None) -> None:
    """TensorBoard logging; `purge_step` hides the points a killed run logged from that step on."""
    options = {"tensorboard": {"purge_step": purge_step}} if purge_step is not None else {}
    accelerator.init_trackers(config.output.name, config=tracker_hyperparameters(config), init_kwargs=options)


def tensorboard(accelerator: Any) -> Any:
    """The run's TensorBoard writer, for images; None when there is none."""
    try:
        return accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return None


def tracker_hyperparameters(config: Config) -> dict[str, Any]:
    """The config flattened to `section.field` scalars, as TensorBoard's hparams accept."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else key, child)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for index, child in enumerate(value):
                visit(f"{prefix}.{index}", child)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config.model_dump(mode="json"))
    return flat
