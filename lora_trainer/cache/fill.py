"""The one way a run's caches are filled, for `lora-train cache-latents` and training alike.

What a run reads from disk: the training images' latents, the validation images' latents, and, when the
text encoders are frozen, the text embeddings of both sets of captions. `cache-latents` fills exactly
what `train` then reuses, with the same VAE fingerprint and the same precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_trainer.cache.latents import LatentCache, open_latent_cache
from lora_trainer.cache.text import TextEmbeddingCache, cache_caption_embeddings
from lora_trainer.cache.training_data import TrainingData, TrainingItem, prepare_training_data, with_cached_latents
from lora_trainer.config.data import DatasetConfig
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import bucket_table
from lora_trainer.data.captions import fixed_caption
from lora_trainer.data.holdout import hold_out
from lora_trainer.model.parts import SDXLParts, load_sdxl
from lora_trainer.model.precision import resolve_mixed_precision, weight_dtype


@dataclass(frozen=True)
class ValidationSet:
    items: list[TrainingItem]  # each with cached latents
    captions: list[str]  # without caption randomness, so every evaluation sees the same text


@dataclass
class FilledCaches:
    training: TrainingData
    validation: ValidationSet | None
    text: TextEmbeddingCache | None  # None: captions are encoded live, every step
    text_reused: int = 0
    text_encoded: int = 0


def fill_caches(config: Config, parts: SDXLParts, device: torch.device, dtype: torch.dtype, show_progress: bool = True) -> FilledCaches:
    """Everything the run reads from disk, found in the cache or made now; `dtype` is the training precision,
    which the text embeddings are kept in."""
    latent_cache = open_latent_cache(config, parts.vae) if config.data.cache_latents or config.validation.enabled else None
    training = prepare_training_data(config, latent_cache, device, show_progress)
    validation = _validation_set(config, training, latent_cache, device, show_progress)
    filled = FilledCaches(training, validation, text=None)
    if config.caches_text_embeddings:
        extra = validation.captions if validation is not None else ()
        filled.text, filled.text_reused, filled.text_encoded = cache_caption_embeddings(
            config, training.records, parts.text, device, dtype, show_progress, extra
        )
    return filled


def precache(config: Config, show_progress: bool = True) -> list[str]:
    """`lora-train cache-latents`: fill the caches `train` reads; return what was reused, encoded and skipped."""
    from accelerate import PartialState

    dtype = weight_dtype(resolve_mixed_precision(config.training.mixed_precision))
    filled = fill_caches(config, load_sdxl(config.model), PartialState().device, dtype, show_progress)
    lines = [bucket_table(filled.training.items, config.training.seed)]
    if filled.training.latents is not None:
        lines.append(filled.training.latents.summary())
    if filled.training.bad:
        lines.append(f"skipped {len(filled.training.bad)} bad files (listed above)")
    if filled.validation is not None:
        lines.append(f"validation: {len(filled.validation.items)} images, latents cached")
    if filled.text is not None:
        lines.append(f"text embeddings: {filled.text_reused} reused, {filled.text_encoded} encoded")
    lines.append(f"cache: {config.cache_dir}")
    return lines


def _validation_set(
    config: Config, training: TrainingData, latent_cache: LatentCache | None, device: torch.device, show_progress: bool
) -> ValidationSet | None:
    """The held-out images (taken out of `training.items` for `fraction`), with cached latents; None when off."""
    settings = config.validation
    if not settings.enabled:
        return None
    if settings.fraction:
        training.items, held_out = hold_out(training.items, settings.fraction, settings.seed)
        if any(item.latent is None for item in held_out):  # training encodes every step; these need a cache
            held_out, _ = with_cached_latents(held_out, config, latent_cache, device, show_progress)
        return _with_fixed_captions(held_out, config.datasets)
    # The separate folder's images are prepared like training ones, always with cached latents.
    separate = config.model_copy(update={
        "datasets": [DatasetConfig(path=settings.path)],
        "data": config.data.model_copy(update={"cache_latents": True}),
    })
    items = prepare_training_data(separate, latent_cache, device, show_progress).items
    return _with_fixed_captions(items, separate.datasets)


def _with_fixed_captions(items: list[TrainingItem], datasets: list[DatasetConfig]) -> ValidationSet:
    captions = [fixed_caption(item.record.caption, datasets[item.record.dataset_index]) for item in items]
    return ValidationSet(list(items), captions)
