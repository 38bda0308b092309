"""An exponential moving average (EMA) of the trainable adapter weights: what the run saves and evaluates.

The average of the iterates is Polyak averaging (Polyak & Juditsky 1992, "Acceleration of stochastic
approximation by averaging"), in its exponential form; the warm-up of the decay is diffusers' `EMAModel`
(`diffusers/training_utils.py`, `EMAModel.get_decay`), which SimpleTuner uses too. The average is kept in
fp32 beside the live weights; training only ever steps the live ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lora_trainer.adapters.wiring import trainable_parameters
from lora_trainer.config.ema import EmaConfig


class AdapterEMA:
    def __init__(self, trained: dict[str, torch.nn.Module], settings: EmaConfig):
        """`trained`: part name -> model (unwrapped: its parameters are the very ones the optimizer steps)."""
        self.settings = settings
        self.updates = 0  # updates done so far; the warm-up counts these, not optimizer steps
        self._parameters = _trainable_by_name(trained)
        device = torch.device("cpu") if settings.on_cpu else None
        self._shadows = {
            name: parameter.detach().to(device or parameter.device, torch.float32, copy=True)
            for name, parameter in self._parameters.items()
        }

    @property
    def names(self) -> list[str]:
        """The averaged parameters as `<part>/<parameter name>`, the keys of `state_tensors`."""
        return list(self._shadows)

    def decay_at(self, updates_before: int) -> float:
        """The decay of the update that follows `updates_before` others: diffusers' `EMAModel.get_decay` without
        `use_ema_warmup` (update_after_step 0, min_decay 0), i.e. 0 for the first update (a copy), then
        min(decay, (1 + n) / (10 + n)); the plain `decay` throughout without the warm-up."""
        if not self.settings.warmup:
            return self.settings.decay
        if updates_before == 0:
            return 0.0
        return min(self.settings.decay, (1 + updates_before) / (10 + updates_before))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1, 2, ...): ema = d * ema + (1 - d) * weights, every
        `update_every_n_steps` steps (Polyak averaging; d from `decay_at`)."""
        if step % self.settings.update_every_n_steps:
            return
        shadows = list(self._shadows.values())
        live = [parameter.detach().to(shadow.device, torch.float32) for parameter, shadow in zip(self._parameters.values(), shadows)]
        torch._foreach_lerp_(shadows, live, 1.0 - self.decay_at(self.updates))  # ema + (1 - d) (w - ema)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The adapters hold the average inside the block; the live weights come back exactly on leaving it,
        an exception included."""
        live = {name: parameter.detach().to(self._shadows[name].device, copy=True) for name, parameter in self._parameters.items()}
        self._copy_into_parameters(self._shadows)
        try:
            yield
        finally:
            self._copy_into_parameters(live)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The average for the training state, on the CPU, by `<part>/<parameter name>`."""
        return {name: shadow.detach().to("cpu").contiguous() for name, shadow in self._shadows.items()}

    def state_values(self) -> dict[str, Any]:
        """What the training state keeps beside the tensors, as JSON."""
        return {"updates": self.updates}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Restore the average and its update count as `state_tensors` / `state_values` gave them (same keys)."""
        for name, shadow in self._shadows.items():
            shadow.copy_(tensors[name])
        self.updates = int(values["updates"])

    @torch.no_grad()
    def _copy_into_parameters(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, parameter in self._parameters.items():
            parameter.copy_(tensors[name])


def make_adapter_ema(
    trained: dict[str, torch.nn.Module], settings: EmaConfig, unwrap: Callable[[torch.nn.Module], torch.nn.Module]
) -> AdapterEMA | None:
    """The run's EMA over the (Accelerate-prepared) trained models, or None when `training.ema` is off."""
    if not settings.enabled:
        return None
    return AdapterEMA({part: unwrap(model) for part, model in trained.items()}, settings)


def _trainable_by_name(trained: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The trainable adapter parameters as `<part>/<parameter name>`; frozen ones (CLIP-L's last layer) never move."""
    named = {}
    for part, model in trained.items():
        trainable = {id(parameter) for parameter in trainable_parameters(model)}
        for name, parameter in model.named_parameters():
            if id(parameter) in trainable:
                named[f"{part}/{name}"] = parameter
    return named
