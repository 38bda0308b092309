"""The training plan printed before the first step: how images become optimizer steps, and the learning rates.

It needs only the config and the data's counts, no model, so a run can be planned before SDXL loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_trainer.config.schema import Config
from lora_trainer.config.training import TrainingConfig
from lora_trainer.fit.schedules import schedule_factors, warmup_steps


@dataclass(frozen=True)
class PartRates:
    """A trained part's learning rate in the run's first step, its highest, and in its last step."""

    first: float
    peak: float
    last: float


@dataclass(frozen=True)
class TrainingPlan:
    images: int  # training items per epoch: each image `repeats` times, and the regularization images
    has_regularization: bool
    batch_size: int  # per device
    processes: int
    accumulation: int
    batches_per_epoch: int  # global batches, from the aspect-ratio buckets
    steps_per_epoch: int
    total_steps: int
    epochs: int
    steps_from_max_steps: bool  # whether training.max_steps set the total rather than the epochs
    lr_scheduler: str
    warmup_steps: int
    warmup_fraction: float | None  # lr_warmup_steps when given as a fraction of the run
    trained_parts: tuple[str, ...]  # unet, text_encoder_1, text_encoder_2: those that train
    adafactor_sets_rates: bool  # Adafactor in relative-step mode: no schedule applies
    learning_rates: dict[str, PartRates] = field(default_factory=dict)  # by part; empty when Adafactor sets them

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes

    @property
    def images_per_step(self) -> int:
        return self.global_batch * self.accumulation

    @property
    def batches_without_buckets(self) -> int:
        """Global batches per epoch if all images shared one bucket."""
        return math.ceil(self.images / self.global_batch)


def training_plan(config: Config, images: int, batches_per_epoch: int, processes: int) -> TrainingPlan:
    """The plan of a run over `images` training items per epoch (repeats and regularization counted) that the
    buckets make into `batches_per_epoch` global batches, on `processes` processes; steps are counted as the
    loop counts them (an epoch's last accumulation may be short, and still makes a step)."""
    training = config.training
    steps_per_epoch = math.ceil(batches_per_epoch / training.gradient_accumulation_steps)
    total_steps = training.max_steps or training.epochs * steps_per_epoch
    adafactor = adafactor_sets_the_rate(training)
    return TrainingPlan(
        images=images,
        has_regularization=any(dataset.is_reg for dataset in config.datasets),
        batch_size=training.batch_size,
        processes=processes,
        accumulation=training.gradient_accumulation_steps,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=math.ceil(total_steps / steps_per_epoch),
        steps_from_max_steps=training.max_steps is not None,
        lr_scheduler=training.lr_scheduler,
        warmup_steps=warmup_steps(training, total_steps),
        warmup_fraction=training.lr_warmup_steps if isinstance(training.lr_warmup_steps, float) else None,
        trained_parts=tuple(config.part_learning_rates),
        adafactor_sets_rates=adafactor,
        learning_rates={} if adafactor else part_rates(config, total_steps),
    )


def part_rates(config: Config, total_steps: int) -> dict[str, PartRates]:
    """First, peak and last learning rate of each trained part, from the real schedule over `total_steps`."""
    factors = list(schedule_factors(config.training, total_steps))
    first, peak, last = factors[0], max(factors), factors[-1]
    return {part: PartRates(rate * first, rate * peak, rate * last) for part, rate in config.part_learning_rates.items()}


def adafactor_sets_the_rate(training: TrainingConfig) -> bool:
    """Whether the optimizer is Adafactor in relative-step mode, which computes its own learning rate."""
    arguments = getattr(training, "optimizer_args", None) or {}
    return training.optimizer == "adafactor" and bool(arguments.get("relative_step"))


def format_plan(plan: TrainingPlan) -> str:
    """The plan as one block of aligned `label  value` lines."""
    rows = [
        ("images x repeats", f"{plan.images} per epoch" + (" (regularization images included)" if plan.has_regularization else "")),
        ("global batch", f"{plan.global_batch} = {plan.batch_size} per device x {plan.processes} process{'es' * (plan.processes != 1)}"),
        ("accumulation", _accumulation(plan)),
        ("batches per epoch", _batches(plan)),
        ("steps per epoch", _steps_per_epoch(plan)),
        ("total steps", _total_steps(plan)),
        ("lr schedule", _schedule(plan)),
        *((f"lr {part}", _rates(plan, part)) for part in plan.trained_parts),
    ]
    width = max(len(label) for label, _ in rows)
    return "training plan:\n" + "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def _accumulation(plan: TrainingPlan) -> str:
    return (
        f"{plan.accumulation} batch{'es' * (plan.accumulation != 1)} per optimizer step: {plan.batch_size} per device x "
        f"{plan.processes} process{'es' * (plan.processes != 1)} x {plan.accumulation} accumulated = {plan.images_per_step} images per step"
    )


def _batches(plan: TrainingPlan) -> str:
    if plan.batches_per_epoch == plan.batches_without_buckets:
        rounded = ", rounded up" if plan.images % plan.global_batch else ""
        return f"{plan.batches_per_epoch} = {plan.images} / {plan.global_batch}{rounded}"
    return (
        f"{plan.batches_per_epoch}: each aspect-ratio bucket's images in batches of {plan.global_batch}, its last batch "
        f"rounded up ({plan.images} / {plan.global_batch} alone would give {plan.batches_without_buckets})"
    )


def _steps_per_epoch(plan: TrainingPlan) -> str:
    rounded = ", rounded up" if plan.batches_per_epoch % plan.accumulation else ""
    return f"{plan.steps_per_epoch} = {plan.batches_per_epoch} batches / {plan.accumulation} accumulated{rounded}"


def _total_steps(plan: TrainingPlan) -> str:
    if not plan.steps_from_max_steps:
        return f"{plan.total_steps} = {plan.epochs} epochs x {plan.steps_per_epoch} steps"
    if plan.epochs == 1:
        return f"{plan.total_steps} (training.max_steps): 1 epoch" + (", cut short" if plan.total_steps < plan.steps_per_epoch else "")
    cut = ", the last one cut short" if plan.total_steps % plan.steps_per_epoch else ""
    return f"{plan.total_steps} (training.max_steps): {plan.epochs} epochs{cut}"


def _schedule(plan: TrainingPlan) -> str:
    if plan.adafactor_sets_rates:
        return "set by Adafactor (relative step size); training.lr_scheduler and lr_warmup_steps do not apply"
    if not plan.warmup_steps and plan.warmup_fraction is None:
        return f"{plan.lr_scheduler}, no warmup"
    fraction = f" ({plan.warmup_fraction:g} of {plan.total_steps}, rounded down)" if plan.warmup_fraction is not None else ""
    return f"{plan.lr_scheduler}, {plan.warmup_steps} warmup step{'s' * (plan.warmup_steps != 1)}{fraction}"


def _rates(plan: TrainingPlan, part: str) -> str:
    if plan.adafactor_sets_rates:
        return "set by Adafactor, from its step count and the weights' scale"
    rates = plan.learning_rates[part]
    return f"first {rates.first:.2e}, peak {rates.peak:.2e}, last {rates.last:.2e}"
