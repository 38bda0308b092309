"""The learning-rate schedule over a run's optimizer steps, from the training config.

The loop steps the schedule once per optimizer step, after it: optimizer step s (counted from 1) trains
with the schedule at index s - 1, so the first step's rate is the schedule at index 0. With W warmup
steps of T, each parameter group's rate at index s is its learning rate times

    s / W                                   while s < W (every schedule but `constant`), then, with p = (s - W) / (T - W):
    constant, constant_with_warmup          1
    linear                                  max(0, 1 - p)
    cosine                                  m + (1 - m) * 0.5 * (1 + cos(pi * p)), m = lr_scheduler_min_lr_ratio
    cosine_with_restarts (n cycles)         0.5 * (1 + cos(pi * ((n * p) mod 1))), 0 from p = 1
    polynomial (power k)                    ((L - e) * (1 - p)^k + e) / L, L = the optimizer's default rate, e = 1e-7

as diffusers' schedules define them (`diffusers.optimization`; polynomial's end rate e is diffusers'
fixed `lr_end`), and transformers' `get_cosine_with_min_lr_schedule_with_warmup` for a cosine with m > 0.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from lora_trainer.config.optimizers import SCHEDULE_FREE
from lora_trainer.config.training import TrainingConfig


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule over `total_steps` optimizer steps, stepped once per optimizer step by the loop
    (not through Accelerate, whose prepared schedule steps once per process: its position would then depend
    on the number of processes, and a run could not resume on another number).

    Adafactor in relative-step mode sets its own rate (Shazeer & Stern 2018, "Adafactor", "relative step size"): then
    the schedule only reports that rate, whatever `lr_scheduler` says.
    """
    if _sets_its_own_rate(optimizer):
        return _adafactor_rates()(_unwrapped(optimizer))
    if config.optimizer in SCHEDULE_FREE:  # it warms up itself (optimizer_options hands it lr_warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    warmup = warmup_steps(config, total_steps)
    if config.lr_scheduler == "cosine" and config.lr_scheduler_min_lr_ratio > 0:
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, min_lr_rate=config.lr_scheduler_min_lr_ratio
        )
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
        num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power,
    )


def warmup_steps(config: TrainingConfig, total_steps: int) -> int:
    """`lr_warmup_steps` in optimizer steps; a fraction of the run is rounded down, as kohya's sd-scripts does
    (`int(lr_warmup_steps * num_training_steps)` in `train_util.get_scheduler_fix`)."""
    if isinstance(config.lr_warmup_steps, float):  # the config keeps floats only for fractions in (0, 1)
        return int(config.lr_warmup_steps * total_steps)
    return config.lr_warmup_steps


def learning_rate_at(config: TrainingConfig, total_steps: int, step: int) -> float:
    """The UNet's learning rate in optimizer step `step` (counted from 1) of a run of `total_steps`."""
    return config.learning_rate * _multiplier(config, total_steps)(step - 1)


def schedule_factors(config: TrainingConfig, total_steps: int) -> Iterator[float]:
    """The factor the schedule applies to every group's learning rate in optimizer steps 1 .. `total_steps`."""
    multiplier = _multiplier(config, total_steps)
    return (multiplier(index) for index in range(total_steps))


def _multiplier(config: TrainingConfig, total_steps: int):
    """The schedule's factor by index, built over a one-parameter probe optimizer whose default rate is the
    UNet's, as the real optimizer's is (diffusers' polynomial divides by it)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    return make_lr_scheduler(probe, config, total_steps).lr_lambdas[0]


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside Accelerate's wrapper, which lacks Adafactor's `_get_lr`."""
    return getattr(optimizer, "optimizer", optimizer)


def _sets_its_own_rate(optimizer: torch.optim.Optimizer) -> bool:
    return bool(_unwrapped(optimizer).defaults.get("relative_step"))


@functools.cache
def _adafactor_rates() -> type:
    """`AdafactorRates`, made on first use: importing transformers takes seconds, which only Adafactor needs."""
    from transformers.optimization import AdafactorSchedule

    class AdafactorRates(AdafactorSchedule):
        """transformers' `AdafactorSchedule`, reporting Adafactor's rate of each group after every step.

        transformers' version reads the rate only of groups whose first parameter still has a gradient, which
        the loop has already cleared when it steps the schedule (so it would report 0), and returns it as a
        tensor, which a saved state cannot hold in JSON: this one reads every stepped group's state and
        returns floats.
        """

        def get_lr(self) -> list[float]:
            optimizer, rates = self.optimizer, []
            for group, base_rate in zip(optimizer.param_groups, self.base_lrs):
                state = optimizer.state.get(group["params"][0], {})
                rates.append(float(optimizer._get_lr(group, state)) if "step" in state else base_rate)
            return rates

    return AdafactorRates
