"""The whole config: its sections, and the rules that tie one section to another.

Every field is documented where it is declared; that text is the config reference (`docs/config.md`,
rendered by `lora_trainer.config.reference`). Rules that tie two fields together live in the model
validators of the section that holds both, or here when they cross sections, never in the training code.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from lora_trainer.config.data import DataConfig, DatasetConfig
from lora_trainer.config.evaluation import SampleConfig, ValidationConfig
from lora_trainer.config.model import ModelConfig
from lora_trainer.config.network import NetworkConfig
from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.config.output import OutputConfig
from lora_trainer.config.section import Section
from lora_trainer.config.training import TrainingConfig


class Config(Section):
    model: ModelConfig
    """The base model."""

    datasets: list[DatasetConfig] = Field(min_length=1)
    """Image folders to train on (one or more)."""

    data: DataConfig = DataConfig()
    """How images become training latents."""

    network: NetworkConfig = NetworkConfig()
    """The LoRA adapters."""

    training: TrainingConfig = TrainingConfig()
    """Optimisation."""

    objective: ObjectiveConfig = ObjectiveConfig()
    """Noise, timesteps and loss weighting: SDXL's own objective unless changed."""

    output: OutputConfig = OutputConfig()
    """Where results go."""

    sample: SampleConfig = SampleConfig()
    """Images drawn during training, to see when the LoRA is done."""

    validation: ValidationConfig = ValidationConfig()
    """A held-out loss, measured the same way at every evaluation."""

    @model_validator(mode="after")
    def _check_caching_fits_the_data(self) -> Config:
        for index, dataset in enumerate(self.datasets):
            if dataset.random_crop and self.data.cache_latents:
                raise ValueError(
                    f"datasets.{index}.random_crop: a random crop changes every epoch, so it cannot come from the "
                    "latent cache; set data.cache_latents: false (the VAE then encodes every step) or drop random_crop"
                )
        if self.data.cache_text_embeddings:
            if self.network.trains_text_encoder:
                raise ValueError(
                    "data.cache_text_embeddings: a text encoder that trains gives new embeddings every step; set "
                    "network.train_text_encoder_1 and train_text_encoder_2 to false, or cache_text_embeddings to false"
                )
            varying = [index for index, dataset in enumerate(self.datasets) if dataset.caption_varies]
            if varying:
                raise ValueError(
                    f"data.cache_text_embeddings: datasets.{varying[0]} shuffles or drops tags, so its captions change "
                    "every time and cannot be cached; turn off shuffle_tags and tag_dropout, or cache_text_embeddings"
                )
        return self

    @model_validator(mode="after")
    def _check_zero_terminal_snr_has_v_prediction(self) -> Config:
        if self.objective.zero_terminal_snr and self.model.prediction_type != "v_prediction":
            raise ValueError(
                "objective.zero_terminal_snr: the last timestep becomes pure noise, where predicting the noise (epsilon) "
                "is ill-posed; set model.prediction_type: v_prediction, or zero_terminal_snr: false"
            )
        return self

    @model_validator(mode="after")
    def _check_masks_have_masked_loss(self) -> Config:
        masked = [index for index, dataset in enumerate(self.datasets) if dataset.gives_masks]
        if masked and not self.objective.masked_loss:
            field = "alpha_mask" if self.datasets[masked[0]].alpha_mask else "mask_dir"
            raise ValueError(
                f"datasets.{masked[0]}.{field}: masks weigh the loss only with objective.masked_loss: true; "
                f"set that too, or remove {field}"
            )
        if self.objective.masked_loss and not masked:
            raise ValueError(
                "objective.masked_loss: no dataset gives masks; set datasets.N.alpha_mask: true (the alpha channel "
                "is the mask) or datasets.N.mask_dir (a folder of mask images), or masked_loss: false"
            )
        return self

    @property
    def part_learning_rates(self) -> dict[str, float]:
        """The base learning rate of each part that trains (before schedules, block weights and LoRA+)."""
        network, unet_rate = self.network, self.training.learning_rate
        rates = {"unet": unet_rate} if network.train_unet else {}
        for part, trains in (("text_encoder_1", network.train_text_encoder_1), ("text_encoder_2", network.train_text_encoder_2)):
            if trains:
                rates[part] = network.text_encoder_learning_rate_of(part, unet_rate)
        return rates

    @property
    def caches_text_embeddings(self) -> bool:
        """Whether prompt embeddings come from the on-disk cache (explicitly, or by default when possible)."""
        if self.data.cache_text_embeddings is not None:
            return self.data.cache_text_embeddings
        return not self.network.trains_text_encoder and not any(dataset.caption_varies for dataset in self.datasets)

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir.expanduser().resolve() if self.data.cache_dir else self.output.dir / "latent_cache"

