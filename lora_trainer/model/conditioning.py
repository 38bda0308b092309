"""SDXL's conditioning, as it was trained: both encoders' penultimate layers, the pooled bigG embedding, time_ids.

- context (cross-attention): CLIP-L `hidden_states[-2]` concatenated on the feature axis with CLIP-bigG
  `hidden_states[-2]`, both without the final LayerNorm (768 + 1280 = 2048 wide on SDXL);
- `text_embeds`: CLIP-bigG's final-LayerNormed state at the first end token, through its projection
  (what `CLIPTextModelWithProjection` returns as `text_embeds`);
- `time_ids`: (original_h, original_w, crop_top, crop_left, target_h, target_w) per image.

Captions past 75 tokens (`data.max_token_length` 150 or 225) follow kohya sd-scripts: 2 or 3 chunks of 75
tokens, each a 77-token pass through both encoders, joined back into one context of 152 or 227 positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# captions -> (context [B, 77 or 1 + 75 n + 1, width_1 + width_2], pooled [B, width_2])
CaptionEncoder = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]

CHUNK_TOKENS = 75  # the caption tokens of one pass through a CLIP encoder, between its start and end token


def tokenize(tokenizer, captions: Sequence[str], max_token_length: int = CHUNK_TOKENS) -> torch.Tensor:
    """Token ids in chunks of one encoder pass, [B, max_token_length / 75, 77], by kohya's rule for long captions.

    Each caption is tokenized to max_token_length + 2 ids (start, its tokens, end, padding); a chunk is the
    start id, the next 75 ids and the last id. One chunk (75) is the plain 77-token encoding.
    """
    inner = tokenizer.model_max_length - 2
    ids = tokenizer(
        list(captions), padding="max_length", max_length=max_token_length + 2, truncation=True, return_tensors="pt"
    ).input_ids
    starts = range(1, max_token_length + 1, inner)
    chunks = torch.stack([torch.cat([ids[:, :1], ids[:, start : start + inner], ids[:, -1:]], dim=1) for start in starts], dim=1)
    if len(starts) > 1 and tokenizer.pad_token_id != tokenizer.eos_token_id:
        _end_chunks(chunks, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return chunks


def _end_chunks(chunks: torch.Tensor, eos: int, pad: int) -> None:
    """For a tokenizer that pads with a token of its own (SDXL's second pads with `!`), in place: a chunk that
    stops inside the caption ends with the end token, and an empty chunk is start, end, padding."""
    before_last = chunks[..., -2]
    inside = (before_last != eos) & (before_last != pad)
    chunks[..., -1] = torch.where(inside, eos, chunks[..., -1])
    chunks[..., 1] = torch.where(chunks[..., 1] == pad, eos, chunks[..., 1])


def token_counts(tokenizer, captions: Sequence[str]) -> list[int]:
    """How many tokens each caption has, without the start and end token."""
    return [len(ids) for ids in tokenizer(list(captions), add_special_tokens=False, verbose=False).input_ids]


def encode_token_ids(
    text_encoder_1: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    ids_1: torch.Tensor,
    ids_2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) for token ids of both tokenizers: [B, 77], or chunks [B, n, 77] from `tokenize`.

    Every chunk goes through the encoders in one batch. The context keeps the first chunk's start state,
    the 75 inner states of every chunk and the last chunk's final state (1 + 75 n + 1 positions); the
    pooled embedding is the first chunk's.
    """
    chunks_1, chunks_2 = (ids.unsqueeze(1) if ids.dim() == 2 else ids for ids in (ids_1, ids_2))
    batch = chunks_1.shape[0]
    output_1 = text_encoder_1(chunks_1.flatten(0, 1), output_hidden_states=True)
    output_2 = text_encoder_2(chunks_2.flatten(0, 1), output_hidden_states=True)
    states = [joined_chunks(output.hidden_states[-2].unflatten(0, (batch, -1))) for output in (output_1, output_2)]
    return torch.cat(states, dim=-1), output_2.text_embeds.unflatten(0, (batch, -1))[:, 0]


def joined_chunks(states: torch.Tensor) -> torch.Tensor:
    """[B, n, 77, W] states of chunks -> [B, 1 + 75 n + 1, W]: the first start, every chunk's inside, the last end."""
    return torch.cat([states[:, 0, :1], states[:, :, 1:-1].flatten(1, 2), states[:, -1, -1:]], dim=1)


def live_caption_encoder(
    tokenizer_1,
    tokenizer_2,
    text_encoder_1: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    device: torch.device,
    max_token_length: int = CHUNK_TOKENS,
) -> CaptionEncoder:
    """Encode captions as they come: used when a text encoder is being trained, to fill the text cache, and for
    sample prompts."""

    def encode(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids_1 = tokenize(tokenizer_1, captions, max_token_length).to(device)
        ids_2 = tokenize(tokenizer_2, captions, max_token_length).to(device)
        return encode_token_ids(text_encoder_1, text_encoder_2, ids_1, ids_2)

    return encode


def time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning for one image; all sizes are (height, width), the crop is (top, left)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
