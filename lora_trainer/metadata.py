"""The safetensors header metadata UIs read to classify and describe a LoRA (every value a string).

Without `ss_base_model_version`, A1111 files a LoRA as SD1 and hides it next to an SDXL checkpoint;
`modelspec.*` is Stability's model-spec that ComfyUI and others show.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from lora_trainer import __version__
from lora_trainer.config import Config
from lora_trainer.data.records import ImageRecord


@dataclass(frozen=True)
class Progress:
    """Where the run stands when a file is saved."""

    steps: int
    epoch: int
    started_at: datetime


def lora_metadata(config: Config, records: Sequence[ImageRecord], progress: Progress) -> dict[str, str]:
    network, training = config.network, config.training
    resolution = config.data.resolution
    text_encoder_lr = network.text_encoder_learning_rate or training.learning_rate
    return {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": str(float(network.alpha)),
        "ss_network_args": json.dumps({}),
        "ss_network_dropout": str(network.dropout),
        "ss_v2": "False",
        "ss_output_name": config.output.name,
        "ss_sd_model_name": config.model.pretrained,
        "ss_vae_name": config.model.vae or "",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(sum(record.repeats for record in records)),
        "ss_tag_frequency": json.dumps(tag_frequency(records, config)),
        "ss_steps": str(progress.steps),
        "ss_epoch": str(progress.epoch),
        "ss_training_started_at": str(progress.started_at.timestamp()),
        "ss_learning_rate": str(training.learning_rate),
        "ss_unet_lr": str(training.learning_rate) if network.train_unet else "",
        "ss_text_encoder_lr": str(text_encoder_lr) if network.trains_text_encoder else "",
        "ss_optimizer": training.optimizer,
        "ss_lr_scheduler": training.lr_scheduler,
        "ss_lr_warmup_steps": str(training.lr_warmup_steps),
        "ss_batch_size_per_device": str(training.batch_size),
        "ss_gradient_accumulation_steps": str(training.gradient_accumulation_steps),
        "ss_max_grad_norm": str(training.max_grad_norm),
        "ss_seed": str(training.seed),
        "ss_mixed_precision": training.mixed_precision,
        "ss_prediction_type": config.model.prediction_type,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": config.output.name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if config.model.prediction_type == "v_prediction" else "epsilon",
        "lora_train_version": __version__,
    }


def tag_frequency(records: Sequence[ImageRecord], config: Config) -> dict[str, dict[str, int]]:
    """Comma-separated caption tags counted per dataset folder, as kohya writes `ss_tag_frequency`."""
    frequency: dict[str, Counter[str]] = {}
    for record in records:
        folder = config.datasets[record.dataset_index].path.name
        tags = (tag.strip() for tag in record.caption.split(","))
        frequency.setdefault(folder, Counter()).update(tag for tag in tags if tag)
    return {folder: dict(counts) for folder, counts in frequency.items()}
