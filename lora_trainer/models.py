"""Load the parts of an SDXL model (diffusers folder, hub id or builtin), weights through safetensors only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_trainer.config import BUILTIN_PREFIX, ModelConfig
from lora_trainer.errors import UserError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass
class TextEncoders:
    """SDXL's two tokenizers and text encoders: CLIP ViT-L (1) and OpenCLIP ViT-bigG with projection (2)."""

    tokenizer_1: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


def model_location(reference: str) -> str:
    """A folder or hub id that `from_pretrained` understands; builds a builtin model on first use."""
    if reference.startswith(BUILTIN_PREFIX):
        from lora_trainer.builtin import builtin_model_path

        return str(builtin_model_path(reference[len(BUILTIN_PREFIX) :]))
    return reference


def load_unet(config: ModelConfig) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return _frozen(_from_pretrained(UNet2DConditionModel, config, "unet", "model.pretrained"))


def load_vae(config: ModelConfig) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    if config.vae:
        with _loading_errors("model.vae", "VAE", config.vae):
            vae = AutoencoderKL.from_pretrained(model_location(config.vae), use_safetensors=True)
        return _frozen(vae)
    return _frozen(_from_pretrained(AutoencoderKL, config, "vae", "model.pretrained"))


def load_text_encoders(config: ModelConfig) -> TextEncoders:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return TextEncoders(
        tokenizer_1=_from_pretrained(CLIPTokenizer, config, "tokenizer", "model.pretrained", weights=False),
        tokenizer_2=_from_pretrained(CLIPTokenizer, config, "tokenizer_2", "model.pretrained", weights=False),
        text_encoder_1=_frozen(_from_pretrained(CLIPTextModel, config, "text_encoder", "model.pretrained")),
        text_encoder_2=_frozen(_from_pretrained(CLIPTextModelWithProjection, config, "text_encoder_2", "model.pretrained")),
    )


def load_noise_scheduler(config: ModelConfig) -> DDPMScheduler:
    """The training noise schedule: DDPM over the model's own betas, with the configured prediction type."""
    from diffusers import DDPMScheduler

    with _loading_errors("model.pretrained", "noise scheduler", config.pretrained):
        scheduler_config = DDPMScheduler.load_config(model_location(config.pretrained), subfolder="scheduler")
    return DDPMScheduler.from_config(scheduler_config, prediction_type=config.prediction_type)


def _from_pretrained(model_class: Any, config: ModelConfig, subfolder: str, field: str, weights: bool = True) -> Any:
    location = model_location(config.pretrained)
    options: dict[str, Any] = {"subfolder": subfolder}
    if weights:
        # Never unpickle: a model that only ships .bin/.ckpt weights is refused here.
        options["use_safetensors"] = True
        if config.variant:
            options["variant"] = config.variant
    with _loading_errors(field, subfolder, config.pretrained):
        return model_class.from_pretrained(location, **options)


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
