"""The parts of an SDXL model, each loaded once per run, weights through safetensors only.

`load_sdxl` hands out one `SDXLParts` that every stage of a run shares: the latent cache, training,
validation and the sample images all use the same VAE, noise scheduler, UNet and text encoders. A part
is read from disk the first time a stage asks for it, so a command that never needs the UNet (caching
latents) never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lora_trainer.config.model import ModelConfig
from lora_trainer.errors import UserError
from lora_trainer.model.sources import model_location

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass
class TextEncoders:
    """SDXL's two tokenizers and text encoders: CLIP ViT-L (1) and OpenCLIP ViT-bigG with projection (2)."""

    tokenizer_1: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


class SDXLParts:
    """One SDXL model's parts, frozen, each loaded on first use and then kept."""

    def __init__(self, config: ModelConfig):
        self.config = config

    @cached_property
    def vae(self) -> AutoencoderKL:
        from diffusers import AutoencoderKL

        if self.config.vae:
            with _loading_errors("model.vae", "VAE", self.config.vae):
                return _frozen(AutoencoderKL.from_pretrained(model_location(self.config.vae), use_safetensors=True))
        return _frozen(self._from_pretrained(AutoencoderKL, "vae"))

    @cached_property
    def unet(self) -> UNet2DConditionModel:
        from diffusers import UNet2DConditionModel

        return _frozen(self._from_pretrained(UNet2DConditionModel, "unet"))

    @cached_property
    def text(self) -> TextEncoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return TextEncoders(
            tokenizer_1=self._from_pretrained(CLIPTokenizer, "tokenizer", weights=False),
            tokenizer_2=self._from_pretrained(CLIPTokenizer, "tokenizer_2", weights=False),
            text_encoder_1=_frozen(self._from_pretrained(CLIPTextModel, "text_encoder")),
            text_encoder_2=_frozen(self._from_pretrained(CLIPTextModelWithProjection, "text_encoder_2")),
        )

    @cached_property
    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule: DDPM over the model's own betas, with the configured prediction type."""
        from diffusers import DDPMScheduler

        with _loading_errors("model.pretrained", "noise scheduler", self.config.pretrained):
            scheduler_config = DDPMScheduler.load_config(model_location(self.config.pretrained), subfolder="scheduler")
        return DDPMScheduler.from_config(scheduler_config, prediction_type=self.config.prediction_type)

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """The parts a LoRA adapts, by part name: the UNet and both text encoders."""
        return {"unet": self.unet, "text_encoder_1": self.text.text_encoder_1, "text_encoder_2": self.text.text_encoder_2}

    def _from_pretrained(self, model_class: Any, subfolder: str, weights: bool = True) -> Any:
        options: dict[str, Any] = {"subfolder": subfolder}
        if weights:
            # Never unpickle: a model that only ships .bin/.ckpt weights is refused here.
            options["use_safetensors"] = True
            if self.config.variant:
                options["variant"] = self.config.variant
        with _loading_errors("model.pretrained", subfolder, self.config.pretrained):
            return model_class.from_pretrained(model_location(self.config.pretrained), **options)


def load_sdxl(config: ModelConfig) -> SDXLParts:
    """The parts of the configured model; each is read from disk when first used, once."""
    return SDXLParts(config)


def _frozen(model: Any) -> Any:
    model.requires_grad_(False)
    model.eval()
    return model


@contextmanager
def _loading_errors(field: str, part: str, reference: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, EnvironmentError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{field}: cannot load the {part} of {reference!r}: {reason} "
            "(check the folder or hub id, your network, and `huggingface-cli login` for gated models)"
        ) from None
