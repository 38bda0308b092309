"""The models the speed benchmark trains on, each a diffusers SDXL folder any trainer can load.

- `shapes`: lora-train's `builtin:shapes-sdxl`, the quickstart's pretrained tiny base, 64 px.
- `tiny`: lora-train's `builtin:tiny-sdxl` (SDXL's layout at channels 32/64/64), 128 px.
- `small`: SDXL's three levels at channels 64/128/256, transformer depth 1/1/2, text encoders 64 and 128 wide,
  256 px: big enough that the UNet's work, not Python, sets a CPU step's time.
- `sdxl-random`: SDXL base 1.0's real architecture (UNet, both text encoders, VAE) with random weights,
  1024 px: SDXL's speed and memory without a download. GPU only; it writes about 7 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

RESOLUTIONS = {"shapes": 64, "tiny": 128, "small": 256, "sdxl-random": 1024}
BUILT_MARK = "lora-train-benchmark-model.json"


def model_folder(name: str, work: Path) -> Path:
    """The diffusers folder of model `name`, built under `work` on first use."""
    if name in ("shapes", "tiny"):
        from lora_trainer.model.builtin import builtin_model_path

        return builtin_model_path(f"{name}-sdxl")
    folder = work / "models" / name
    if not (folder / BUILT_MARK).exists():
        _build(name, folder)
    return folder


def _build(name: str, folder: Path) -> None:
    import torch

    torch.manual_seed(0)
    device = "cuda" if name == "sdxl-random" and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        pipeline = _small_pipeline() if name == "small" else _sdxl_random_pipeline()
    dtype = torch.float16 if name == "sdxl-random" else torch.float32
    pipeline.to(dtype=dtype).save_pretrained(folder, safe_serialization=True)
    (folder / BUILT_MARK).write_text(json.dumps({"model": name, "dtype": str(dtype)}))


def _small_pipeline():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from lora_trainer.model.builtin import clip_tokenizers, clip_vocabulary_text_encoders, sdxl_scheduler, tiny_vae
    from lora_trainer.model.sdxl_architecture import SDXL_UNET

    tokenizer_1, tokenizer_2 = clip_tokenizers()
    text_widths, time_width = (64, 128), 32
    vae = tiny_vae()
    text_encoder_1, text_encoder_2 = clip_vocabulary_text_encoders(text_widths)
    unet = UNet2DConditionModel(**{
        **SDXL_UNET,
        "sample_size": 32,
        "block_out_channels": (64, 128, 256),
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": (1, 2, 4),  # SDXL's heads of 64 channels
        "cross_attention_dim": sum(text_widths),
        "addition_time_embed_dim": time_width,
        "projection_class_embeddings_input_dim": text_widths[1] + 6 * time_width,
    })
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder_1, text_encoder_2=text_encoder_2, tokenizer=tokenizer_1, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=sdxl_scheduler(),
    )


def _sdxl_random_pipeline():
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.model.builtin import SDXL_BASE_FOLDER, clip_tokenizers, sdxl_scheduler

    tokenizer_1, tokenizer_2 = clip_tokenizers()
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE_FOLDER / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_FOLDER / "text_encoder")),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_BASE_FOLDER / "text_encoder_2")),
        tokenizer=tokenizer_1,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_FOLDER / "unet")),
        scheduler=sdxl_scheduler(),
    )
