"""Drawing images with SDXL: a base model plus any number of LoRAs, for `lora-train sample` and during training.

LoRAs act as live adapters, each file its own, so they stack with their weights and `--compare` draws the
same seed again with them switched off.

The denoising runs in diffusers' SDXL pipeline; the final VAE decode is ours, in fp32, because SDXL's
VAE overflows in half precision and the pipeline's own upcasting depends on how it was built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from lora_trainer.adapters.lora import adapters_disabled
from lora_trainer.config.prompts import PromptSpec
from lora_trainer.config.sample_command import SampleRequest
from lora_trainer.export.load import load_loras_into
from lora_trainer.export.lora_file import read_lora_file
from lora_trainer.files import write_bytes_atomic
from lora_trainer.model.conditioning import CHUNK_TOKENS, live_caption_encoder
from lora_trainer.model.parts import TextEncoders, load_sdxl
from lora_trainer.model.vae import unscale_latents
from lora_trainer.progress import progress_bar
from lora_trainer.sampling.base_check import warn_about_other_bases
from lora_trainer.sampling.png_info import GenerationInfo, save_png
from lora_trainer.sampling.schedulers import ZERO_TERMINAL_SNR_GUIDANCE_RESCALE, make_scheduler, zero_terminal_snr_sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drawing:
    """One image to draw: a filled-in prompt and the seed of this image."""

    index: int  # the prompt's position, for file names
    spec: PromptSpec
    seed: int


def drawings(specs: Sequence[PromptSpec], images_per_prompt: int = 1) -> list[Drawing]:
    """Each prompt `images_per_prompt` times, with seeds seed, seed + 1, ... (as A1111 numbers a batch)."""
    return [Drawing(index, spec, spec.seed + offset) for index, spec in enumerate(specs) for offset in range(images_per_prompt)]


def sample_images(request: SampleRequest) -> list[Path]:
    """Draw every prompt with the LoRAs; with `compare`, also without them, and the two side by side.

    Prompts without a size get the model's native size (1024 px on SDXL).
    """
    device, dtype = inference_device()
    files = [(read_lora_file(choice.path), choice.weight, str(choice.path)) for choice in request.loras]  # a bad file fails early
    parts = load_sdxl(request.model)
    warn_about_other_bases(files, request.model)
    load_loras_into(parts.lora_targets(), files)
    zero_snr = any(lora.metadata.get("ss_zero_terminal_snr") == "True" for lora, _, _ in files)
    scheduler = zero_terminal_snr_sampling(parts.noise_scheduler) if zero_snr else parts.noise_scheduler
    guidance_rescale = ZERO_TERMINAL_SNR_GUIDANCE_RESCALE if zero_snr else 0.0
    if zero_snr:
        log.info("a LoRA was trained with zero-terminal SNR: trailing timesteps and guidance rescale %g", guidance_rescale)
    pipeline = pipeline_from_parts(parts.unet, parts.text, parts.vae, scheduler)
    place(pipeline, device, dtype)
    native = pipeline.default_sample_size * pipeline.vae_scale_factor
    specs = [replace(spec, width=spec.width or native, height=spec.height or native) for spec in request.specs]
    lora_names = tuple((choice.name, choice.weight) for choice in request.loras)
    model, out = request.model.pretrained, request.out
    paths = []
    for drawing in progress_bar(drawings(specs, request.images_per_prompt), desc="sampling", unit="img"):
        image = draw(pipeline, drawing, request.max_token_length, guidance_rescale)
        stem = f"{drawing.index:02d}-{slug(drawing.spec.prompt)}-seed{drawing.seed}"
        paths.append(out / f"{stem}.png")
        save_png(paths[-1], image, generation_info(drawing, model, lora_names))
        if request.compare:
            with adapters_disabled(parts.lora_targets().values()):
                base = draw(pipeline, drawing, request.max_token_length, guidance_rescale)
            save_png(out / f"{stem}-base.png", base, generation_info(drawing, model, ()))
            paths.append(out / f"{stem}-compare.png")
            write_bytes_atomic(paths[-1], _png(side_by_side(base, image, "without LoRA", "with LoRA")))
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
def draw(pipeline: Any, drawing: Drawing, max_token_length: int = CHUNK_TOKENS, guidance_rescale: float = 0.0) -> Image.Image:
    """One image; the same drawing gives the same image on every run (the noise comes from a CPU generator).
    `guidance_rescale` is the pipeline's (Lin et al. 2023, arXiv:2305.08891, section 3.4; 0 leaves it off)."""
    spec = drawing.spec
    base_config = pipeline.scheduler.config
    pipeline.scheduler = make_scheduler(spec.sampler, base_config, base_config.prediction_type)
    latents = pipeline(
        **prompt_embeddings(pipeline, spec, max_token_length),
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        guidance_rescale=guidance_rescale,
        width=spec.width,
        height=spec.height,
        generator=torch.Generator(device="cpu").manual_seed(drawing.seed),
        output_type="latent",
    ).images
    return decode(pipeline, latents)[0]


def prompt_embeddings(pipeline: Any, spec: PromptSpec, max_token_length: int) -> dict[str, torch.Tensor]:
    """The prompt (and negative prompt) encoded as training encodes captions, for the pipeline: handed prompt
    text, it would cut every prompt at 75 tokens. Without a negative prompt the pipeline zeroes the negative
    conditioning, as SDXL does; a negative prompt gets as many positions as the prompt (same `max_token_length`)."""
    device = next(pipeline.text_encoder.parameters()).device
    encode = live_caption_encoder(
        pipeline.tokenizer, pipeline.tokenizer_2, pipeline.text_encoder, pipeline.text_encoder_2, device, max_token_length
    )
    context, pooled = encode([spec.prompt])
    embeddings = {"prompt_embeds": context, "pooled_prompt_embeds": pooled}
    if spec.negative_prompt:
        context, pooled = encode([spec.negative_prompt])
        embeddings.update(negative_prompt_embeds=context, negative_pooled_prompt_embeds=pooled)
    return embeddings


def decode(pipeline: Any, latents: torch.Tensor) -> list[Image.Image]:
    """The pictures of a batch of latents (in the UNet's units, as `scale_latents` made them)."""
    vae = pipeline.vae
    pixels = vae.decode(unscale_latents(vae, latents.to(vae.device, vae.dtype))).sample
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
    """The two images in a row under a white band with their labels (diffusers' grid has no labels)."""
    from diffusers.utils import make_image_grid

    band = 20
    pair = make_image_grid([left, right], rows=1, cols=2)
    canvas = Image.new("RGB", (pair.width, pair.height + band), "white")
    canvas.paste(pair, (0, band))
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 4), left_label, fill="black")
    pen.text((left.width + 4, 4), right_label, fill="black")
    return canvas


def inference_device() -> tuple[torch.device, torch.dtype]:
    """Accelerate's device for this process, and bf16 (fp16 on GPUs without it) there; fp32 off CUDA."""
    from accelerate import PartialState

    device = PartialState().device
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "prompt"


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
