"""The text-embedding cache: with frozen text encoders a caption always encodes the same, so it is encoded
once, kept on disk (keyed by the caption, the encoders' weights and `data.max_token_length`), and read back each step.

Reading from disk instead of holding every embedding keeps memory flat in the number of captions
(an SDXL caption's embeddings take 0.3-0.6 MB), and lets the text encoders leave the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lora_trainer.cache.fingerprint import module_fingerprint, tensor_digest, text_digest
from lora_trainer.config.schema import Config
from lora_trainer.data.captions import fixed_caption
from lora_trainer.data.records import ImageRecord
from lora_trainer.errors import UserError
from lora_trainer.files import write_bytes_atomic
from lora_trainer.model.conditioning import CHUNK_TOKENS, CaptionEncoder, live_caption_encoder
from lora_trainer.model.parts import TextEncoders
from lora_trainer.progress import progress_bar

TEXT_CACHE_FORMAT = 1


class TextEmbeddingCache:
    def __init__(self, folder: Path, encoders_fingerprint: str, dtype: torch.dtype, max_token_length: int = CHUNK_TOKENS):
        self.folder = folder
        self.encoders_fingerprint = encoders_fingerprint
        self.dtype = dtype
        self.max_token_length = max_token_length  # a caption encodes differently at 75, 150 and 225 tokens

    def path(self, caption: str) -> Path:
        length = f"max_token_length={self.max_token_length}"
        key = text_digest(str(TEXT_CACHE_FORMAT), self.encoders_fingerprint, str(self.dtype), length, caption)
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(context, pooled) for the caption, or None when absent or damaged."""
        try:
            with safe_open(self.path(caption), framework="pt") as handle:
                expected = json.loads(handle.metadata()["sha256"])
                context, pooled = handle.get_tensor("context"), handle.get_tensor("pooled")
        except (OSError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError):
            return None
        if [tensor_digest(context), tensor_digest(pooled)] != expected:
            return None
        return context, pooled

    def store(self, caption: str, context: torch.Tensor, pooled: torch.Tensor) -> None:
        tensors = {
            "context": context.detach().to("cpu", self.dtype).contiguous(),
            "pooled": pooled.detach().to("cpu", self.dtype).contiguous(),
        }
        metadata = {"caption": caption, "sha256": json.dumps([tensor_digest(tensors["context"]), tensor_digest(tensors["pooled"])])}
        path = self.path(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, save(tensors, metadata))


def text_encoders_fingerprint(tokenizer_1, tokenizer_2, text_encoder_1: torch.nn.Module, text_encoder_2: torch.nn.Module) -> str:
    """Names the pair of text encoders (and their tokenizers' vocabularies) an embedding came from."""
    vocabularies = [text_digest(json.dumps(sorted(tokenizer.get_vocab().items()))) for tokenizer in (tokenizer_1, tokenizer_2)]
    return text_digest(*vocabularies, module_fingerprint(text_encoder_1), module_fingerprint(text_encoder_2))


@torch.no_grad()
def fill_text_cache(
    captions: Sequence[str], cache: TextEmbeddingCache, encode: CaptionEncoder, batch_size: int = 16, show_progress: bool = True
) -> tuple[int, int]:
    """Encode the captions not cached yet; return (reused, encoded)."""
    distinct = sorted(set(captions))
    missing = [caption for caption in distinct if cache.load(caption) is None]
    with progress_bar(total=len(missing), desc="caching text embeddings", unit="caption", disable=not show_progress or not missing) as bar:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            context, pooled = encode(chunk)
            for index, caption in enumerate(chunk):
                cache.store(caption, context[index], pooled[index])
            bar.update(len(chunk))
    return len(distinct) - len(missing), len(missing)


def cached_caption_encoder(cache: TextEmbeddingCache, device: torch.device, dtype: torch.dtype) -> CaptionEncoder:
    """A caption encoder that reads embeddings from the cache (every caption must have been cached)."""

    def lookup(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        found = [cache.load(caption) for caption in captions]
        if any(entry is None for entry in found):
            missing = next(caption for caption, entry in zip(captions, found) if entry is None)
            raise UserError(
                f"{cache.path(missing)}: the cached text embedding of {missing!r} disappeared or was damaged during "
                "training; start the run again (it re-encodes what is missing)"
            )
        context = torch.stack([entry[0] for entry in found]).to(device, dtype)
        pooled = torch.stack([entry[1] for entry in found]).to(device, dtype)
        return context, pooled

    return lookup


def training_captions(config: Config, records: Sequence[ImageRecord]) -> list[str]:
    """Every caption training can produce when no tag randomness is on (the empty one too, with caption dropout)."""
    captions = {fixed_caption(record.caption, config.datasets[record.dataset_index]) for record in records}
    if any(dataset.caption_dropout > 0 for dataset in config.datasets):
        captions.add("")
    return sorted(captions)


def cache_caption_embeddings(
    config: Config,
    records: Sequence[ImageRecord],
    text: TextEncoders,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
    extra_captions: Sequence[str] = (),
) -> tuple[TextEmbeddingCache, int, int]:
    """Fill the text-embedding cache for these records' captions (and `extra_captions`) with the frozen encoders
    in `text`, on `device` in `dtype`, which they leave for the CPU afterwards (their outputs now come from
    disk); return the cache and how many captions were reused and encoded."""
    fingerprint = text_encoders_fingerprint(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2)
    max_token_length = config.data.max_token_length
    cache = TextEmbeddingCache(config.cache_dir / "text", fingerprint, dtype, max_token_length)
    encoders = (text.text_encoder_1, text.text_encoder_2)
    for encoder in encoders:
        encoder.to(device, dtype)
    encode = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, *encoders, device, max_token_length)
    captions = training_captions(config, records) + list(extra_captions)
    reused, encoded = fill_text_cache(captions, cache, encode, show_progress=show_progress)
    for encoder in encoders:
        encoder.to("cpu")
    return cache, reused, encoded
