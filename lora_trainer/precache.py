"""`lora-train cache-latents`: fill the caches `train` reads, and say what was reused, encoded and skipped."""

from __future__ import annotations

import torch

from lora_trainer.config import Config
from lora_trainer.data.pipeline import bucket_table, prepare_training_data
from lora_trainer.data.text_cache import cache_caption_embeddings
from lora_trainer.models import load_text_encoders, load_vae
from lora_trainer.precision import resolve_mixed_precision, weight_dtype


def fill_caches(config: Config, show_progress: bool = True) -> list[str]:
    """Fill the latent cache (and the text-embedding cache when training will use it); return report lines."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = prepare_training_data(config, device, lambda: load_vae(config.model), show_progress)
    lines = [bucket_table(data.items, config.training.seed)]
    if data.latents is not None:
        lines.append(data.latents.summary())
    if data.bad:
        lines.append(f"skipped {len(data.bad)} bad files (listed above)")
    if config.caches_text_embeddings:
        # The same precision as training, so training finds these entries.
        dtype = weight_dtype(resolve_mixed_precision(config.training.mixed_precision))
        text = load_text_encoders(config.model)
        text.text_encoder_1.to(device, dtype)
        text.text_encoder_2.to(device, dtype)
        _, reused, encoded = cache_caption_embeddings(config, data.records, text, device, dtype, show_progress)
        lines.append(f"text embeddings: {reused} reused, {encoded} encoded")
    lines.append(f"cache: {config.cache_dir}")
    return lines
