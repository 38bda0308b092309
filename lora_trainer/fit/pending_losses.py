"""The losses of the steps since the loop last read them: kept on the device and read back all at once.

Each read makes the CPU wait for the GPU (`fit.update_guard` says why that is avoided), so the loop reads at
the logging cadence and before anything that reports or saves. Every step's loss is still reported, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PendingStep:
    step: int  # the optimizer steps done, this one included
    epoch: int
    loss: torch.Tensor  # this process's mean over the step's batches, on the device
    learning_rates: list[float]
    scalars: dict[str, float]
    # (image paths, whether each image's latents are finite) of the batches the VAE encoded during the step, to
    # name the image that made a loss non-finite; empty with a latent cache, which refuses such images earlier
    latent_checks: list[tuple[list[str], torch.Tensor]] = field(default_factory=list)


class PendingLosses:
    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.steps: list[PendingStep] = []

    def add(self, step: PendingStep) -> None:
        self.steps.append(step)

    def read(self) -> list[tuple[PendingStep, float]]:
        """Each pending step with its loss averaged over the processes (every process must call this alike)."""
        if not self.steps:
            return []
        steps, self.steps = self.steps, []
        losses = self.accelerator.reduce(torch.stack([step.loss for step in steps]), reduction="mean")
        return list(zip(steps, losses.tolist()))
