"""SDXL's conditioning, as it was trained: both encoders' penultimate layers, the pooled bigG embedding, time_ids.

- context (cross-attention): CLIP-L `hidden_states[-2]` concatenated on the feature axis with CLIP-bigG
  `hidden_states[-2]`, both without the final LayerNorm (768 + 1280 = 2048 wide on SDXL);
- `text_embeds`: CLIP-bigG's final-LayerNormed state at the first end token, through its projection
  (what `CLIPTextModelWithProjection` returns as `text_embeds`);
- `time_ids`: (original_h, original_w, crop_top, crop_left, target_h, target_w) per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# captions -> (context [B, 77, width_1 + width_2], pooled [B, width_2])
CaptionEncoder = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's context length (77 on SDXL)."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_token_ids(
    text_encoder_1: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    ids_1: torch.Tensor,
    ids_2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) for token ids of both tokenizers."""
    output_1 = text_encoder_1(ids_1, output_hidden_states=True)
    output_2 = text_encoder_2(ids_2, output_hidden_states=True)
    context = torch.cat([output_1.hidden_states[-2], output_2.hidden_states[-2]], dim=-1)
    return context, output_2.text_embeds


def live_caption_encoder(
    tokenizer_1, tokenizer_2, text_encoder_1: torch.nn.Module, text_encoder_2: torch.nn.Module, device: torch.device
) -> CaptionEncoder:
    """Encode captions every step: used when a text encoder is being trained."""

    def encode(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids_1 = tokenize(tokenizer_1, captions).to(device)
        ids_2 = tokenize(tokenizer_2, captions).to(device)
        return encode_token_ids(text_encoder_1, text_encoder_2, ids_1, ids_2)

    return encode


def time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning for one image; all sizes are (height, width), the crop is (top, left)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
