"""`lora-train sample`: images from a base model plus a LoRA, through diffusers' SDXL pipeline."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.config import ModelConfig
from lora_trainer.files import write_bytes_atomic
from lora_trainer.lora_io import load_lora_into, read_lora_file
from lora_trainer.models import load_text_encoders, load_unet, load_vae, model_location
from lora_trainer.progress import progress_bar


@dataclass(frozen=True)
class SampleSettings:
    prompts: Sequence[str]
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 7.0
    width: int | None = None  # None: the model's native size
    height: int | None = None


def sample_images(
    model: ModelConfig, lora_path: Path | None, settings: SampleSettings, out_dir: Path, lora_scale: float = 1.0
) -> list[Path]:
    """Generate one PNG per prompt into `out_dir`; every prompt uses the same seed, so runs compare."""
    pipeline = build_pipeline(model, lora_path, lora_scale)
    paths = []
    for index, prompt in enumerate(progress_bar(settings.prompts, desc="sampling", unit="img")):
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        image = pipeline(
            prompt=prompt,
            negative_prompt=settings.negative_prompt or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            width=settings.width,
            height=settings.height,
            generator=generator,
        ).images[0]
        path = out_dir / f"{index:02d}-{_slug(prompt)}-seed{settings.seed}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_bytes_atomic(path, buffer.getvalue())
        paths.append(path)
    return paths


def build_pipeline(model: ModelConfig, lora_path: Path | None, lora_scale: float = 1.0):
    """The SDXL pipeline on the best device here, with the LoRA (ours or any kohya-format file) attached."""
    from diffusers import StableDiffusionXLPipeline

    device, dtype = _inference_device()
    text = load_text_encoders(model)
    unet = load_unet(model)
    if lora_path is not None:
        models = {"unet": unet, "text_encoder_1": text.text_encoder_1, "text_encoder_2": text.text_encoder_2}
        load_lora_into(models, read_lora_file(lora_path), scale=lora_scale, source=str(lora_path))
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model_location(model.pretrained),
        unet=unet,
        vae=load_vae(model),
        text_encoder=text.text_encoder_1,
        text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer_1,
        tokenizer_2=text.tokenizer_2,
    )
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type=model.prediction_type)
    pipeline.set_progress_bar_config(disable=True)
    # In fp16 the pipeline itself upcasts SDXL's VAE (force_upcast), which overflows otherwise.
    pipeline.to(device, dtype)
    return pipeline


def _inference_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def _slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "prompt"
