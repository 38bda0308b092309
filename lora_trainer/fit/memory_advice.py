"""What to change when a run's estimated GPU memory is over the GPU's: each setting of this config that would
lower it, with the estimate it would give, worked out by the estimate itself."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lora_trainer.fit.memory_estimate import (
    OPTIMIZER_STATE_BYTES,
    MemorySettings,
    ModelCounts,
    estimate_peak_memory,
)

MIN_SUGGESTED_RESOLUTION = 512
RESOLUTION_STEP = 64
# Past this share of the limit the plan says the run is close: the allocator reserves more than it hands out.
CLOSE_TO_LIMIT = 0.9


@dataclass(frozen=True)
class Change:
    setting: str  # as the config writes it, e.g. "training.gradient_checkpointing: true"
    estimate_gib: float


def memory_changes(counts: ModelCounts, settings: MemorySettings, limit_gib: float) -> list[Change]:
    """The changes that lower the estimate, in the order they cost the LoRA least (speed first, then precision of
    the frozen parts, then what it learns from)."""
    candidates = [
        ("training.gradient_checkpointing: true", replace(settings, gradient_checkpointing=True))
        if not settings.gradient_checkpointing else None,
        _eight_bit_optimizer(settings),
        ("training.ema.on_cpu: true", replace(settings, ema_on_gpu=False)) if settings.ema_on_gpu else None,
        ("training.mixed_precision: bf16", replace(settings, mixed_precision="bf16")) if settings.mixed_precision == "no" else None,
        ("model.base_precision: fp8", replace(settings, base_precision="fp8"))
        if settings.base_precision_field and settings.base_precision not in ("fp8", "int8", "nf4") else None,
        _smaller_batch(counts, settings, limit_gib),
        _frozen_text_encoders(settings),
        _lower_resolution(counts, settings, limit_gib),
    ]
    before = _gib(counts, settings)
    changes = []
    for candidate in candidates:
        if candidate is None:
            continue
        setting, changed = candidate
        after = _gib(counts, changed)
        if after < before:
            changes.append(Change(setting, after))
    return changes


def memory_warning(counts: ModelCounts, settings: MemorySettings, limit_gib: float) -> str | None:
    """One line when the estimate is over `limit_gib` (or close to it), naming what to change; None when it fits."""
    estimate = _gib(counts, settings)
    if estimate > limit_gib:
        changes = memory_changes(counts, settings, limit_gib)
        if not changes:
            return (
                f"warning: the estimated peak of {estimate:.2f} GiB is over --gpu-memory {limit_gib:g} GiB, and no setting of "
                "this config lowers it; train on a GPU with more memory"
            )
        listed = "; ".join(
            f"{change.setting} -> {change.estimate_gib:.2f} GiB{' (fits)' if change.estimate_gib <= limit_gib else ''}" for change in changes
        )
        return f"warning: the estimated peak of {estimate:.2f} GiB is over --gpu-memory {limit_gib:g} GiB; each of these lowers it: {listed}"
    if estimate > CLOSE_TO_LIMIT * limit_gib:
        return (
            f"note: the estimated peak of {estimate:.2f} GiB is within {1 - CLOSE_TO_LIMIT:.0%} of --gpu-memory {limit_gib:g} GiB; "
            "the CUDA context and the allocator's cached blocks come on top of it"
        )
    return None


def _eight_bit_optimizer(settings: MemorySettings) -> tuple[str, MemorySettings] | None:
    target = "lion8bit" if settings.optimizer == "lion" else "adamw8bit"
    if OPTIMIZER_STATE_BYTES.get(settings.optimizer, 8) <= OPTIMIZER_STATE_BYTES[target]:
        return None
    return f"training.optimizer: {target}", replace(settings, optimizer=target)


def _smaller_batch(counts: ModelCounts, settings: MemorySettings, limit_gib: float) -> tuple[str, MemorySettings] | None:
    """The largest divisor of the batch size that fits alone (else 1), with the accumulation that keeps the images per step."""
    batch = settings.batch_size
    if batch == 1:
        return None
    divisors = [size for size in range(batch - 1, 0, -1) if batch % size == 0]
    size = next((size for size in divisors if _gib(counts, replace(settings, batch_size=size)) <= limit_gib), 1)
    accumulation = settings.accumulation * batch // size
    return (
        f"training.batch_size: {size} with training.gradient_accumulation_steps: {accumulation}, the same images per step",
        replace(settings, batch_size=size, accumulation=accumulation),
    )


def _frozen_text_encoders(settings: MemorySettings) -> tuple[str, MemorySettings] | None:
    trained = [part for part in settings.trained_parts if part != "unet"]
    if not trained or "unet" not in settings.trained_parts:
        return None
    fields = " and ".join(f"network.train_{part}: false" for part in trained)
    cached = " (their embeddings are then cached and they leave the GPU)" if settings.text_encoders_could_cache else ""
    return f"{fields}{cached}", replace(settings, trained_parts=("unet",), text_encoders_on_gpu=not settings.text_encoders_could_cache)


def _lower_resolution(counts: ModelCounts, settings: MemorySettings, limit_gib: float) -> tuple[str, MemorySettings] | None:
    """The largest resolution down to 512 px that fits alone, else 512 px."""
    lower = range(settings.resolution - RESOLUTION_STEP, MIN_SUGGESTED_RESOLUTION - 1, -RESOLUTION_STEP)
    candidates = list(lower)
    if not candidates:
        return None
    resolution = next((size for size in candidates if _gib(counts, replace(settings, resolution=size)) <= limit_gib), candidates[-1])
    return f"data.resolution: {resolution}", replace(settings, resolution=resolution)


def _gib(counts: ModelCounts, settings: MemorySettings) -> float:
    return estimate_peak_memory(counts, settings).total_gib
