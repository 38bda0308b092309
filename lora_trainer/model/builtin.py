"""Builtin models: tiny models with SDXL's exact layout, for trying lora-train and for tests without SDXL weights.

- `builtin:shapes-sdxl` is pretrained and ships with the package (`lora_trainer/model/pretrained/`): it draws
  red, yellow, green or blue circles, squares and triangles at 64 px from prompts like "a red circle",
  so a LoRA that teaches it something new shows in its pictures. `scripts/pretrain_example_base.py`
  made it; its README gives the recipe and how well it draws.
- `builtin:tiny-sdxl`, described below, has random weights and is built on first use.

`builtin:tiny-sdxl`: a tiny model with random weights and SDXL's exact layout, saved as a diffusers folder.

SDXL weights cannot be downloaded everywhere (CI, offline laptops), so the quickstart and the tests
train this instead. It is loaded through the same code path as a real SDXL folder. It is *not*
SDXL and draws nothing meaningful; it has SDXL's structure so that every name, shape rule and
conditioning path is exercised:

- UNet: three levels `DownBlock2D, CrossAttnDownBlock2D x2` / `CrossAttnUpBlock2D x2, UpBlock2D`,
  two resnets per down level and three per up level (so the LDM block indices match SDXL's),
  linear `proj_in`/`proj_out`, `addition_embed_type="text_time"`.
- Two CLIP text encoders: a `CLIPTextModel` and a `CLIPTextModelWithProjection`, whose penultimate
  hidden states are concatenated as on SDXL.
- A four-level VAE (8x downsampling, as SDXL's) with SDXL's scaling factor, and SDXL's scheduler.
- SDXL's own two CLIP tokenizers (49,408 tokens; the first pads with the end token, the second with
  `!`), shipped in `pretrained/sdxl-base/`, and SDXL's legacy text-encoder token ids (bos 0, eos 2,
  pad 1) read from the configs there. With `eos_token_id == 2` transformers pools at the highest
  token id (CLIP's end token) instead of searching for the end token, so the tiny encoders take the
  same pooling path as SDXL's.

`make_tiny_tokenizers` makes the byte-level tokenizers of `builtin:shapes-sdxl` (one token per
character, so every made-up word has real tokens); `scripts/pretrain_example_base.py` uses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_trainer.errors import UserError
from lora_trainer.files import directory_atomic, write_text_atomic
from lora_trainer.model.sdxl_architecture import CLIP_BIGG, CLIP_L, SDXL_UNET

# Bump when the recipe changes, so an old build in a user's cache is not reused.
TINY_SDXL_VERSION = 2

TEXT_ENCODER_1_WIDTH = 32
TEXT_ENCODER_2_WIDTH = 64
TIME_ID_EMBED_WIDTH = 8
MAX_TOKENS = 77  # SDXL's context length: 75 tokens plus start and end


def user_cache_dir() -> Path:
    """`$LORA_TRAIN_HOME`, else `$XDG_CACHE_HOME/lora-train`, else `~/.cache/lora-train`."""
    if os.environ.get("LORA_TRAIN_HOME"):
        return Path(os.environ["LORA_TRAIN_HOME"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora-train"


PRETRAINED_FOLDER = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_MODELS = ("shapes-sdxl",)
# SDXL base 1.0's configs and tokenizers, without weights (scripts/build_clip_tokenizers.py wrote the tokenizers).
SDXL_BASE_FOLDER = PRETRAINED_FOLDER / "sdxl-base"
BYTE_LEVEL_VOCAB_SIZE = 2 * 256 + 2


def builtin_model_path(name: str) -> Path:
    """The folder of builtin model `name`: shipped with the package, or built on first use."""
    if name in PRETRAINED_MODELS:
        folder = PRETRAINED_FOLDER / name
        if not (folder / "model_index.json").is_file():
            raise UserError(
                f"model.pretrained: builtin:{name} is missing from {folder}; reinstall lora-train, "
                "or rebuild it with scripts/pretrain_example_base.py"
            )
        return folder
    if name != "tiny-sdxl":
        raise ValueError(f"unknown builtin model {name!r}")
    folder = user_cache_dir() / "builtin" / f"tiny-sdxl-v{TINY_SDXL_VERSION}"
    if not (folder / "model_index.json").is_file():
        with directory_atomic(folder) as staging:
            build_tiny_sdxl(staging)
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> None:
    """Write the tiny SDXL-shaped pipeline (random weights, fixed seed) into `folder`."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer_1, tokenizer_2 = clip_tokenizers()
    vae = tiny_vae()  # drawn in this order from the seed: the VAE, the text encoders, the UNet
    text_encoder_1, text_encoder_2 = clip_vocabulary_text_encoders()
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder_1,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer_1,
        tokenizer_2=tokenizer_2,
        unet=tiny_unet(),
        scheduler=sdxl_scheduler(),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    write_text_atomic(
        folder / "README.md",
        "# builtin:tiny-sdxl\n\nRandom weights in Stable Diffusion XL's layout, built by lora-train for "
        "trying the tool and for tests. This is not SDXL and draws nothing meaningful.\n",
    )


def clip_tokenizers():
    """SDXL base 1.0's two CLIP tokenizers, shipped in `pretrained/sdxl-base`."""
    from transformers import CLIPTokenizer

    tokenizers = tuple(CLIPTokenizer.from_pretrained(SDXL_BASE_FOLDER, subfolder=sub) for sub in ("tokenizer", "tokenizer_2"))
    assert all(len(tokenizer) == CLIP_L["vocab_size"] for tokenizer in tokenizers), "pretrained/sdxl-base's tokenizers are not CLIP's"
    return tokenizers


def clip_vocabulary_text_encoders(widths: tuple[int, int] = (TEXT_ENCODER_1_WIDTH, TEXT_ENCODER_2_WIDTH)):
    """Tiny stand-ins of SDXL's CLIP-L and CLIP-bigG, `widths` wide, on CLIP's vocabulary with SDXL's token ids."""
    vocab_size = CLIP_L["vocab_size"]
    return (
        tiny_text_encoder(widths[0], CLIP_L["hidden_act"], projection=False, vocab_size=vocab_size, **sdxl_token_ids("text_encoder")),
        tiny_text_encoder(widths[1], CLIP_BIGG["hidden_act"], projection=True, vocab_size=vocab_size, **sdxl_token_ids("text_encoder_2")),
    )


def make_tiny_tokenizers():
    """Two CLIP tokenizers over a byte-level vocabulary: every byte, alone and as a word end.

    With no merges every word splits into single characters, all of which are in the vocabulary,
    so nothing maps to the unknown token. The start and end tokens come last, the end token highest,
    as in CLIP (the pooled embedding is read at the first end token). The first tokenizer pads with
    the end token and the second with `!`, as SDXL's two tokenizers do.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer_1 = CLIPTokenizer(vocab=dict(vocab), merges=[], model_max_length=MAX_TOKENS)
    tokenizer_2 = CLIPTokenizer(vocab=dict(vocab), merges=[], pad_token="!", model_max_length=MAX_TOKENS)
    return tokenizer_1, tokenizer_2


def sdxl_token_ids(part: str) -> dict[str, int]:
    """The bos, eos and pad ids in SDXL base 1.0's config of text encoder `part`: its legacy 0, 2 and 1."""
    config = json.loads((SDXL_BASE_FOLDER / part / "config.json").read_text(encoding="utf-8"))
    return {name: config[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}


def tiny_text_encoder(
    width: int,
    hidden_act: str,
    pad_token_id: int,
    projection: bool,
    vocab_size: int = BYTE_LEVEL_VOCAB_SIZE,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
):
    """A 3-layer CLIP text encoder; bos and eos default to the two highest ids, where CLIP's tokenizers put them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
        eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    # SDXL's block layout as it is; only the widths and the number of transformer blocks shrink.
    return UNet2DConditionModel(
        **{
            **SDXL_UNET,
            "sample_size": 16,  # 128 px images through the 8x VAE
            "block_out_channels": (32, 64, 64),
            "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (2, 4, 4),
            "norm_num_groups": 16,
            "cross_attention_dim": TEXT_ENCODER_1_WIDTH + TEXT_ENCODER_2_WIDTH,
            "addition_time_embed_dim": TIME_ID_EMBED_WIDTH,
            "projection_class_embeddings_input_dim": TEXT_ENCODER_2_WIDTH + 6 * TIME_ID_EMBED_WIDTH,
        }
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=128,
        scaling_factor=0.13025,
    )


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
