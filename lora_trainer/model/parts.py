"""The parts of an SDXL model, each loaded once per run, weights through safetensors only.

`load_sdxl` hands out one `SDXLParts` that every stage of a run shares: the latent cache, training,
validation and the sample images all use the same VAE, noise scheduler, UNet and text encoders. A part
is read from disk the first time a stage asks for it, so a command that never needs the UNet (caching
latents) never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.config.model import ModelConfig, is_model_file
from lora_trainer.errors import ModelFileError, UserError
from lora_trainer.model.single_file import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    SingleFileCheckpoint,
    VaeFile,
    check_fully_loaded,
    conversion_errors,
    quiet_libraries,
)
from lora_trainer.model.sources import SDXL_BASE_CONFIG, model_location

log = logging.getLogger(__name__)

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
    """One SDXL model's parts, frozen, each loaded on first use and then kept.

    A single-file checkpoint is classified from its header when the parts are made (a wrong file is
    refused before anything loads); a folder, hub id or builtin model is read with `from_pretrained`.
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self.checkpoint = _single_file(config) if is_model_file(config.pretrained) else None
        self.vae_file = _vae_file(config) if config.vae and is_model_file(config.vae) else None

    @cached_property
    def vae(self) -> AutoencoderKL:
        from diffusers import AutoencoderKL

        if self.vae_file is not None:
            with conversion_errors(self.vae_file.label, "VAE"):
                return _frozen(self._vae_from_file(self.vae_file.tensors(), self.vae_file.label))
        if self.config.vae:
            with _loading_errors("model.vae", "VAE", self.config.vae):
                return _frozen(AutoencoderKL.from_pretrained(model_location(self.config.vae), use_safetensors=True))
        if self.checkpoint is not None:
            with conversion_errors(self.checkpoint.label, "VAE"):
                return _frozen(self._vae_from_file(self.checkpoint.tensors(VAE_PREFIX), self.checkpoint.label))
        return _frozen(self._from_pretrained(AutoencoderKL, "vae"))

    @cached_property
    def unet(self) -> UNet2DConditionModel:
        from diffusers import UNet2DConditionModel

        if self.checkpoint is None:
            return _frozen(self._from_pretrained(UNet2DConditionModel, "unet"))
        with conversion_errors(self.checkpoint.label, "UNet"), quiet_libraries():
            unet = UNet2DConditionModel.from_single_file(
                self.checkpoint.tensors(UNET_PREFIX), **self._single_file_options("unet")
            )
        check_fully_loaded(unet, self.checkpoint.label, "UNet")
        return _frozen(unet)

    @cached_property
    def text(self) -> TextEncoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if self.checkpoint is None:
            return TextEncoders(
                tokenizer_1=self._from_pretrained(CLIPTokenizer, "tokenizer", weights=False),
                tokenizer_2=self._from_pretrained(CLIPTokenizer, "tokenizer_2", weights=False),
                text_encoder_1=_frozen(self._from_pretrained(CLIPTextModel, "text_encoder")),
                text_encoder_2=_frozen(self._from_pretrained(CLIPTextModelWithProjection, "text_encoder_2")),
            )
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

        tensors = self.checkpoint.tensors(TEXT_PREFIX)
        encoders = []
        for model_class, subfolder in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
            with conversion_errors(self.checkpoint.label, subfolder), quiet_libraries():
                options = self._single_file_options(subfolder)
                encoder = create_diffusers_clip_model_from_ldm(model_class, tensors, **options)
            check_fully_loaded(encoder, self.checkpoint.label, subfolder)
            encoders.append(_frozen(encoder))
        location = self._config_location()
        with _loading_errors("model.config", "tokenizers", location), quiet_libraries():
            tokenizers = [CLIPTokenizer.from_pretrained(location, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
        return TextEncoders(*tokenizers, *encoders)

    @cached_property
    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule: DDPM over the model's own betas, with the model's prediction type."""
        return training_noise_scheduler(self._scheduler_config, self.prediction_type, zero_terminal_snr=False)

    @cached_property
    def zero_terminal_snr_scheduler(self) -> DDPMScheduler:
        """`noise_scheduler` with its betas rescaled to zero terminal SNR (`training_noise_scheduler`)."""
        return training_noise_scheduler(self._scheduler_config, self.prediction_type, zero_terminal_snr=True)

    def noise_scheduler_for(self, zero_terminal_snr: bool) -> DDPMScheduler:
        """The training schedule of a run with `objective.zero_terminal_snr` set or not (training, validation and
        in-training samples all take this one)."""
        return self.zero_terminal_snr_scheduler if zero_terminal_snr else self.noise_scheduler

    @cached_property
    def prediction_type(self) -> str:
        """`model.prediction_type`, else what the model declares, else epsilon; a setting against the file is refused."""
        chosen = self.config.prediction_type
        if self.checkpoint is not None:
            declared = self.checkpoint.facts.prediction_type
            if chosen and declared and chosen != declared:
                raise ModelFileError(
                    f"model.prediction_type: {chosen}, but {self.checkpoint.path.name} says {declared}; remove the "
                    "setting to use the file's, or check that this is the checkpoint you meant"
                )
            return chosen or declared or "epsilon"
        return chosen or self._scheduler_config.get("prediction_type") or "epsilon"

    @cached_property
    def _scheduler_config(self) -> dict[str, Any]:
        from diffusers import DDPMScheduler

        location = self._config_location()
        field = "model.pretrained" if self.checkpoint is None or self.config.config is None else "model.config"
        with _loading_errors(field, "noise scheduler", location):
            return dict(DDPMScheduler.load_config(location, subfolder="scheduler"))

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """The parts a LoRA adapts, by part name: the UNet and both text encoders."""
        return {"unet": self.unet, "text_encoder_1": self.text.text_encoder_1, "text_encoder_2": self.text.text_encoder_2}

    def _config_location(self) -> str:
        """Where the diffusers configs (and, for a file, tokenizers) come from."""
        if self.checkpoint is None:
            return model_location(self.config.pretrained)
        return model_location(self.config.config) if self.config.config else str(SDXL_BASE_CONFIG)

    def _single_file_options(self, subfolder: str) -> dict[str, Any]:
        import torch

        # float32 as `from_pretrained` gives; precision.py casts the frozen parts for training afterwards.
        return {"config": self._config_location(), "subfolder": subfolder, "local_files_only": True, "torch_dtype": torch.float32}

    def _vae_from_file(self, tensors: dict[str, Any], label: str) -> AutoencoderKL:
        from diffusers import AutoencoderKL

        with quiet_libraries():
            vae = AutoencoderKL.from_single_file(tensors, **self._single_file_options("vae"))
        check_fully_loaded(vae, label, "VAE")
        return vae

    def _from_pretrained(self, model_class: Any, subfolder: str, weights: bool = True) -> Any:
        options: dict[str, Any] = {"subfolder": subfolder}
        if weights:
            # Never unpickle: a model that only ships .bin/.ckpt weights is refused here.
            options["use_safetensors"] = True
            if self.config.variant:
                options["variant"] = self.config.variant
        if self.config.revision:
            options["revision"] = self.config.revision
        with _loading_errors("model.pretrained", subfolder, self.config.pretrained), quiet_libraries():
            return model_class.from_pretrained(model_location(self.config.pretrained), **options)


def training_noise_scheduler(scheduler_config: dict[str, Any], prediction_type: str, zero_terminal_snr: bool) -> DDPMScheduler:
    """DDPM over the model's betas; with `zero_terminal_snr`, diffusers' `rescale_betas_zero_snr`, which is Lin et al.
    2023 (arXiv:2305.08891), Algorithm 1: sqrt(abar) shifted so its last value is 0 and scaled so its first is
    unchanged, hence SNR(T - 1) = 0 exactly. Without it, a model config that already rescales keeps doing so."""
    from diffusers import DDPMScheduler

    rescaled = {"rescale_betas_zero_snr": True} if zero_terminal_snr else {}
    return DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type, **rescaled)


def _single_file(config: ModelConfig) -> SingleFileCheckpoint:
    # With model.config the user describes their own architecture, so only the family is checked.
    checkpoint = SingleFileCheckpoint(Path(config.pretrained), "model.pretrained", require_base_shape=config.config is None)
    if not checkpoint.facts.has_text_encoders:
        raise ModelFileError(
            f"{checkpoint.label}: holds no text encoders (a UNet-only file); lora-train needs a full SDXL checkpoint"
        )
    if not checkpoint.facts.has_vae and not config.vae:
        raise ModelFileError(f"{checkpoint.label}: holds no VAE; set model.vae to an SDXL VAE (file, folder or hub id)")
    return checkpoint


def _vae_file(config: ModelConfig) -> VaeFile:
    return VaeFile(Path(config.vae), "model.vae")


def load_sdxl(config: ModelConfig) -> SDXLParts:
    """The parts of the configured model; each is read from disk when first used, once.

    What the model is and predicts is settled here, from headers and configs only, so a wrong file or a
    conflicting `model.prediction_type` stops the run before anything is cached or trained.
    """
    parts = SDXLParts(config)
    prediction_type = parts.prediction_type
    if parts.checkpoint is not None:
        log.info("model: %s, %s", parts.checkpoint.facts.description, prediction_type)
        if parts.checkpoint.facts.zero_terminal_snr:
            log.warning(
                "model.pretrained: %s was trained with zero-terminal SNR; lora-train uses the scheduler's betas "
                "as they are unless objective.zero_terminal_snr is true (with model.prediction_type: v_prediction), "
                "which trains with the rescaled ones it was made with",
                parts.checkpoint.path.name,
            )
    return parts


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
