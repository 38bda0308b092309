"""The optimizer over the adapters' parameter groups (`fit.param_groups`), and the schedule-free optimizers' modes."""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import Any

import torch

from lora_trainer.config.optimizers import OPTIMIZERS, optimizer_options, uses_own_learning_rate
from lora_trainer.config.training import TrainingConfig
from lora_trainer.errors import UserError

log = logging.getLogger(__name__)


def make_optimizer(groups: Sequence[dict[str, Any]], config: TrainingConfig) -> torch.optim.Optimizer:
    """The configured optimizer over parameter `groups` (each `{"name": ..., "params": [...], "lr": ...}`), its class
    and arguments as lora_trainer/config/optimizers.py names them: the learning rate, the training fields that apply,
    then `optimizer_args`. Adafactor in relative-step mode sets its own rate, so the groups' rates are left out."""
    spec = OPTIMIZERS[config.optimizer]
    if uses_own_learning_rate(config):
        groups = [{key: value for key, value in group.items() if key != "lr"} for group in groups]
    if config.optimizer == "prodigy":
        _check_one_learning_rate(groups)
    optimizer_class = _optimizer_class(config.optimizer, spec.implementation)
    try:
        with redirect_stdout(io.StringIO()):  # prodigyopt prints "Using decoupled weight decay" on stdout
            return optimizer_class(groups, **optimizer_options(config))
    except ValueError as error:  # a value out of the optimizer's range, e.g. Nesterov with momentum 0
        raise UserError(f"training.optimizer_args: {config.optimizer} refused its arguments ({error}); change them") from None


def _check_one_learning_rate(groups: Sequence[dict[str, Any]]) -> None:
    """Prodigy estimates one step size for all parameters, so it refuses (at its first step) groups whose learning
    rates differ, other than 0 for a frozen group."""
    rates = sorted({group["lr"] for group in groups if group.get("lr")})
    if len(rates) > 1:
        named = ", ".join(f"{group.get('name', index)} {group['lr']:g}" for index, group in enumerate(groups) if "lr" in group)
        raise UserError(
            f"training.optimizer: prodigy takes one learning rate for everything it trains, but the parts have {named}; "
            "remove the per-part learning rates (network.text_encoder_learning_rate, ...) or pick another optimizer"
        )


def _optimizer_class(name: str, implementation: str) -> type[torch.optim.Optimizer]:
    module_name, class_name = implementation.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except Exception as error:  # a package with a native library fails to load in many ways
        package = module_name.split(".")[0].replace("_", "-")
        raise UserError(
            f"training.optimizer: {name} needs {package}, which failed to load ({error}); install it (pip install {package}) "
            "or use adamw"
        ) from None


def log_optimizer_notes(config: TrainingConfig) -> None:
    """What the optimizer does with the config that the config itself does not say, a line each; for the setup to
    call once, on the main process."""
    if config.optimizer == "prodigy" and config.learning_rate < 0.1:
        # Prodigy's step is learning_rate x its own estimate d (Mishchenko & Defazio 2023), so lr scales it.
        log.warning(
            "training.learning_rate is %g with prodigy, which estimates the step size itself and expects about 1.0: "
            "its steps are %g times the size it estimates (optimizer_args.d_coef is the way to scale them)",
            config.learning_rate, config.learning_rate,
        )
    if uses_own_learning_rate(config):
        log.info(
            "adafactor with optimizer_args.relative_step sets its own learning rate (Shazeer & Stern 2018): "
            "training.learning_rate, lr_scheduler and the per-part learning rates are ignored"
        )


def _has_modes(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


def optimizer_train_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer (Defazio et al. 2024, "The Road Less Scheduled") in training mode, which it must
    be in for every step: the weights become the point its gradients are taken at. Other optimizers: nothing."""
    if _has_modes(optimizer):
        optimizer.train()


@contextmanager
def optimizer_in_eval_mode(optimizer: Any) -> Iterator[None]:
    """While the block runs, a schedule-free optimizer's weights are its average x, the ones to sample, validate and
    save (Defazio et al. 2024); back in training mode after. Other optimizers have no modes: nothing changes."""
    if not _has_modes(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
