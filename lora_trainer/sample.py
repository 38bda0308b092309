"""Drawing images with SDXL: a base model plus any number of LoRAs, for `lora-train sample` and during training.

The denoising runs in diffusers' SDXL pipeline; the final VAE decode is ours, in fp32, because SDXL's
VAE overflows in half precision and the pipeline's own upcasting depends on how it was built.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from lora_trainer.config import ModelConfig
from lora_trainer.files import write_bytes_atomic
from lora_trainer.lora_io import merge_lora_into, read_lora_file
from lora_trainer.models import TextEncoders, load_noise_scheduler, load_text_encoders, load_unet, load_vae
from lora_trainer.png_info import GenerationInfo, png_bytes
from lora_trainer.progress import progress_bar
from lora_trainer.prompts import PromptSpec
from lora_trainer.samplers import make_scheduler


@dataclass(frozen=True)
class LoraChoice:
    path: Path
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class Drawing:
    """One image to draw: a filled-in prompt and the seed of this image."""

    index: int  # the prompt's position, for file names
    spec: PromptSpec
    seed: int


def drawings(specs: Sequence[PromptSpec], images_per_prompt: int = 1) -> list[Drawing]:
    """Each prompt `images_per_prompt` times, with seeds seed, seed + 1, ... (as A1111 numbers a batch)."""
    return [Drawing(index, spec, spec.seed + offset) for index, spec in enumerate(specs) for offset in range(images_per_prompt)]


def sample_images(
    model: ModelConfig,
    loras: Sequence[LoraChoice],
    specs: Sequence[PromptSpec],
    out_dir: Path,
    images_per_prompt: int = 1,
    compare: bool = False,
) -> list[Path]:
    """Draw every prompt with the LoRAs merged in; with `compare`, also without them and side by side.

    Prompts without a size get the model's native size (1024 px on SDXL).
    """
    device, dtype = inference_device()
    text, unet = load_text_encoders(model), load_unet(model)
    files = [(choice, read_lora_file(choice.path)) for choice in loras]  # read all first: a bad file fails early
    pipeline = pipeline_from_parts(unet, text, load_vae(model), load_noise_scheduler(model))
    native = pipeline.default_sample_size * pipeline.vae_scale_factor
    todo = drawings([replace(spec, width=spec.width or native, height=spec.height or native) for spec in specs], images_per_prompt)
    base_images = []
    if compare:
        place(pipeline, device, dtype)
        base_images = [draw(pipeline, drawing) for drawing in progress_bar(todo, desc="sampling without LoRA", unit="img")]
        place(pipeline, torch.device("cpu"), torch.float32)  # LoRAs are merged into the fp32 weights
    for choice, lora in files:
        merge_lora_into(_parts(unet, text), lora, choice.weight, source=str(choice.path))
    place(pipeline, device, dtype)
    lora_names = tuple((choice.name, choice.weight) for choice in loras)
    paths = []
    for position, drawing in enumerate(progress_bar(todo, desc="sampling", unit="img")):
        image = draw(pipeline, drawing)
        stem = f"{drawing.index:02d}-{slug(drawing.spec.prompt)}-seed{drawing.seed}"
        paths.append(out_dir / f"{stem}.png")
        write_bytes_atomic(paths[-1], png_bytes(image, generation_info(drawing, model.pretrained, lora_names)))
        if compare:
            base_info = generation_info(drawing, model.pretrained, ())
            write_bytes_atomic(out_dir / f"{stem}-base.png", png_bytes(base_images[position], base_info))
            paths.append(out_dir / f"{stem}-compare.png")
            write_bytes_atomic(paths[-1], _png(side_by_side(base_images[position], image, "without LoRA", "with LoRA")))
    return paths


def place(pipeline: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Move the pipeline to `device` in `dtype`, keeping the VAE in fp32 (SDXL's VAE overflows in fp16)."""
    pipeline.to(device, dtype)
    pipeline.vae.to(torch.float32)


def pipeline_from_parts(unet: torch.nn.Module, text: TextEncoders, vae: torch.nn.Module, scheduler: Any):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text.text_encoder_1,
        text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer_1,
        tokenizer_2=text.tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def draw(pipeline: Any, drawing: Drawing) -> Image.Image:
    """One image; the same drawing gives the same image on every run (the noise comes from a CPU generator)."""
    spec = drawing.spec
    base_config = pipeline.scheduler.config
    pipeline.scheduler = make_scheduler(spec.sampler, base_config, base_config.prediction_type)
    latents = pipeline(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt or None,  # None: SDXL's zeroed negative conditioning
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        width=spec.width,
        height=spec.height,
        generator=torch.Generator(device="cpu").manual_seed(drawing.seed),
        output_type="latent",
    ).images
    return decode(pipeline, latents)[0]


def decode(pipeline: Any, latents: torch.Tensor) -> list[Image.Image]:
    """The pictures of a batch of latents (in the UNet's units, as `scale_latents` made them)."""
    vae = pipeline.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    pixels = vae.decode(latents).sample
    return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")


def generation_info(drawing: Drawing, model: str, loras: tuple[tuple[str, float], ...]) -> GenerationInfo:
    spec = drawing.spec
    return GenerationInfo(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt or "",
        steps=spec.steps,
        sampler=spec.sampler,
        guidance_scale=spec.guidance_scale,
        seed=drawing.seed,
        width=spec.width,
        height=spec.height,
        model=model,
        loras=loras,
    )


def side_by_side(left: Image.Image, right: Image.Image, left_label: str, right_label: str) -> Image.Image:
    band = 20
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height) + band), "white")
    canvas.paste(left, (0, band))
    canvas.paste(right, (left.width, band))
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 4), left_label, fill="black")
    pen.text((left.width + 4, 4), right_label, fill="black")
    return canvas


def inference_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "prompt"


def _parts(unet: torch.nn.Module, text: TextEncoders) -> dict[str, torch.nn.Module]:
    return {"unet": unet, "text_encoder_1": text.text_encoder_1, "text_encoder_2": text.text_encoder_2}


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
