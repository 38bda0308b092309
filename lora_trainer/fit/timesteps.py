"""Each image's training timestep, drawn from the image's own generator by `objective.timestep_distribution`.

Every distribution but `uniform` draws a number x in [0, 1) and maps it into the configured range [low, high)
as `low + floor(x * (high - low))`, so the range is the distribution's support, squeezed or not. `uniform`
draws the integer directly, as SDXL was trained and as earlier versions drew it (their resumes stay exact).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.errors import UserError


def timestep_range(objective: ObjectiveConfig, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) of the timesteps drawn: the configured range, checked against the schedule's length."""
    high = objective.max_timestep or num_train_timesteps
    if high > num_train_timesteps:
        raise UserError(
            f"objective.max_timestep: {high} is past the noise schedule's {num_train_timesteps} timesteps; "
            f"set it to {num_train_timesteps} or less"
        )
    if objective.min_timestep >= high:
        raise UserError(
            f"objective.min_timestep: {objective.min_timestep} leaves no timestep below {high}; set it lower"
        )
    return objective.min_timestep, high


def draw_timesteps(
    objective: ObjectiveConfig, num_train_timesteps: int, generator: torch.Generator, count: int = 1
) -> torch.Tensor:
    """`count` integer timesteps (int64, on the generator's device) from the configured distribution."""
    low, high = timestep_range(objective, num_train_timesteps)
    if objective.timestep_distribution == "uniform":
        return torch.randint(low, high, (count,), generator=generator, device=generator.device)
    steps = low + torch.floor(_unit_draws(objective, generator, count) * (high - low)).long()
    return steps.clamp_(low, high - 1)  # a sigmoid can round to exactly 1.0


def _unit_draws(objective: ObjectiveConfig, generator: torch.Generator, count: int) -> torch.Tensor:
    """x in [0, 1): logit-normal (Esser et al. 2024, SD3, section 3.1: x = sigmoid(N(mean, std))), or shifted
    (SD3 section 5.3.2: x = shift * u / (1 + (shift - 1) * u) for a uniform u)."""
    options = {"generator": generator, "device": generator.device, "dtype": torch.float64}
    if objective.timestep_distribution == "logit_normal":
        return torch.sigmoid(objective.logit_mean + objective.logit_std * torch.randn(count, **options))
    if objective.timestep_distribution == "shifted":
        shift, uniform = objective.timestep_shift, torch.rand(count, **options)
        return shift * uniform / (1 + (shift - 1) * uniform)
    raise ValueError(f"unknown timestep distribution {objective.timestep_distribution!r}")


def unit_cdf(objective: ObjectiveConfig, x: float) -> float:
    """P(X <= x) for the distribution's x in [0, 1] (uniform: x itself)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    distribution = objective.timestep_distribution
    if distribution == "logit_normal":
        standard = (math.log(x / (1 - x)) - objective.logit_mean) / objective.logit_std
        return 0.5 * (1 + math.erf(standard / math.sqrt(2)))
    if distribution == "shifted":
        shift = objective.timestep_shift
        return x / (shift - (shift - 1) * x)  # the inverse of the shift map
    return x


def timestep_probabilities(objective: ObjectiveConfig, num_train_timesteps: int) -> list[float]:
    """P(t = k) for every timestep k of the schedule, as `draw_timesteps` draws them."""
    low, high = timestep_range(objective, num_train_timesteps)
    width = high - low
    probabilities = [0.0] * num_train_timesteps
    for step in range(low, high):
        probabilities[step] = unit_cdf(objective, (step + 1 - low) / width) - unit_cdf(objective, (step - low) / width)
    return probabilities


def describe_distribution(objective: ObjectiveConfig, num_train_timesteps: int) -> str:
    """The distribution and its settings in a few words, e.g. `logit_normal (mean 0, std 1) over [0, 1000)`."""
    low, high = timestep_range(objective, num_train_timesteps)
    settings = {
        "uniform": "",
        "logit_normal": f" (mean {objective.logit_mean:g}, std {objective.logit_std:g})",
        "shifted": f" (shift {objective.timestep_shift:g})",
    }[objective.timestep_distribution]
    return f"{objective.timestep_distribution}{settings} over [{low}, {high})"


def write_timestep_histogram_of_run(
    path: Path, objective: ObjectiveConfig, counts: list[int], num_train_timesteps: int, run_name: str
) -> None:
    """The histogram of the timesteps drawn so far (`RunHistory.timestep_counts`) under the configured density."""
    from lora_trainer.report.plots import write_timestep_histogram

    title = f"{run_name}: timesteps drawn, {describe_distribution(objective, num_train_timesteps)}"
    write_timestep_histogram(path, counts, timestep_probabilities(objective, num_train_timesteps), title)
