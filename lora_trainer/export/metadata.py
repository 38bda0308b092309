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
from lora_trainer.config.network import NetworkConfig
from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.config.optimizers import kohya_optimizer_name
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import PlannedImage
from lora_trainer.data.captions import split_tags
from lora_trainer.data.epochs import epoch_items
from lora_trainer.data.records import Folder, ImageRecord


@dataclass(frozen=True)
class BaseModel:
    """The base a LoRA was trained on, as its metadata names it (kohya's `ss_sd_model_*` keys)."""

    name: str  # a file or folder's own name, a hub id, or a builtin name
    prediction_type: str  # as the run used it: from the config, else from the model
    legacy_hash: str = ""  # A1111's short model hash, for a single-file base
    sha256: str = ""  # of the whole file, for a single-file base
    vae_name: str = ""


@dataclass(frozen=True)
class Progress:
    """Where the run stands when a file is saved."""

    steps: int
    epoch: int
    started_at: datetime


def lora_metadata(
    config: Config, images: Sequence[PlannedImage], folders: Sequence[Folder], progress: Progress, base: BaseModel
) -> dict[str, str]:
    """The metadata of a LoRA trained with `config` on `images` (from `folders`) over `base`, saved at `progress`."""
    network, training = config.network, config.training
    resolution = config.data.resolution
    records = [image.record for image in images]
    return {
        "ss_base_model_version": "sdxl_base_v1-0",
        **network_module_metadata(network),
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": str(float(network.alpha)),
        "ss_network_dropout": str(network.dropout),
        "ss_v2": "False",
        "ss_output_name": config.output.name,
        "ss_sd_model_name": base.name,
        "ss_sd_model_hash": base.legacy_hash,
        "ss_new_sd_model_hash": base.sha256,
        "ss_vae_name": base.vae_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(sum(record.repeats for record in records if not record.is_reg)),
        "ss_num_reg_images": str(sum(record.repeats for record in records if record.is_reg)),
        "ss_tag_frequency": json.dumps(tag_frequency(records, config)),
        "ss_dataset_dirs": json.dumps(dataset_dirs(records, folders, is_reg=False)),
        "ss_reg_dataset_dirs": json.dumps(dataset_dirs(records, folders, is_reg=True)),
        "ss_bucket_info": json.dumps(bucket_info(images, training.seed)) if config.data.buckets else "null",
        "ss_enable_bucket": str(config.data.buckets),
        "ss_min_bucket_reso": str(config.data.smallest_side),
        "ss_max_bucket_reso": str(config.data.largest_side),
        "ss_bucket_no_upscale": str(config.data.bucket_no_upscale),
        "ss_flip_aug": str(any(dataset.flip_aug for dataset in config.datasets)),
        "ss_random_crop": str(any(dataset.random_crop for dataset in config.datasets)),
        "ss_shuffle_caption": str(any(dataset.shuffle_tags for dataset in config.datasets)),
        "ss_keep_tokens": str(max(dataset.keep_tokens for dataset in config.datasets)),
        "ss_max_token_length": str(config.data.max_token_length),
        "ss_caption_dropout_rate": str(max(dataset.caption_dropout for dataset in config.datasets)),
        "ss_caption_tag_dropout_rate": str(max(dataset.tag_dropout for dataset in config.datasets)),
        "ss_steps": str(progress.steps),
        "ss_epoch": str(progress.epoch),
        "ss_training_started_at": str(progress.started_at.timestamp()),
        "ss_learning_rate": str(training.learning_rate),
        "ss_unet_lr": str(training.learning_rate) if network.train_unet else "",
        **kohya_learning_rate_metadata(config),
        "ss_optimizer": kohya_optimizer_name(training),
        "ss_scale_weight_norms": str(network.scale_weight_norms),
        "lora_train_ema": json.dumps(training.ema.model_dump() if training.ema.enabled else None),
        "ss_lr_scheduler": training.lr_scheduler,
        "ss_lr_warmup_steps": str(training.lr_warmup_steps),
        "ss_batch_size_per_device": str(training.batch_size),
        "ss_gradient_accumulation_steps": str(training.gradient_accumulation_steps),
        "ss_max_grad_norm": str(training.max_grad_norm),
        "ss_seed": str(training.seed),
        "ss_mixed_precision": training.mixed_precision,
        "ss_prediction_type": base.prediction_type,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": config.output.name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
        "lora_train_version": __version__,
        **objective_metadata(config.objective),
    }


def tag_frequency(records: Sequence[ImageRecord], config: Config) -> dict[str, dict[str, int]]:
    """Caption tags counted per image folder, as kohya writes `ss_tag_frequency` (which UIs show as the LoRA's tags)."""
    frequency: dict[str, Counter[str]] = {}
    for record in records:
        separator = config.datasets[record.dataset_index].tag_separator
        frequency.setdefault(record.folder, Counter()).update(split_tags(record.caption, separator))
    return {folder: dict(counts) for folder, counts in frequency.items()}


def dataset_dirs(records: Sequence[ImageRecord], folders: Sequence[Folder], is_reg: bool) -> dict[str, dict[str, int]]:
    """Per folder: its repeats and usable images (kohya's `ss_dataset_dirs` / `ss_reg_dataset_dirs`)."""
    counts = Counter(record.folder for record in records if record.is_reg == is_reg)
    return {
        folder.path.name: {"n_repeats": folder.repeats, "img_count": counts[folder.path.name]}
        for folder in folders
        if folder.path.name in counts
    }


def bucket_info(images: Sequence[PlannedImage], seed: int) -> dict:
    """Bucket sizes (width, height) with the images one epoch trains on, and the mean aspect-ratio error."""
    per_epoch = Counter(image.plan.bucket for image in epoch_items(images, seed))
    buckets = sorted(per_epoch, key=lambda size: size[1] / size[0])
    errors = [abs(image.plan.original[1] / image.plan.original[0] - image.plan.bucket[1] / image.plan.bucket[0]) for image in images]
    return {
        "buckets": {str(index): {"resolution": [size[1], size[0]], "count": per_epoch[size]} for index, size in enumerate(buckets)},
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }


def objective_metadata(objective: ObjectiveConfig) -> dict[str, str]:
    """The noise, timestep and loss methods under kohya's `ss_*` names, so civitai and A1111 show them; the
    settings kohya lacks go under `lora_train_*`. A method that is off reads "None", as kohya writes it."""

    def when_on(value: float) -> str:
        return str(value) if value else "None"

    return {
        "ss_noise_offset": when_on(objective.noise_offset),
        "ss_noise_offset_random_strength": str(objective.noise_offset_random_strength),
        "ss_multires_noise_iterations": when_on(objective.multires_noise_iterations),
        "ss_multires_noise_discount": str(objective.multires_noise_discount),
        "ss_ip_noise_gamma": when_on(objective.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(objective.ip_noise_gamma_random_strength),
        "ss_min_snr_gamma": when_on(objective.min_snr_gamma),
        "ss_debiased_estimation": str(objective.debiased_estimation),
        "ss_zero_terminal_snr": str(objective.zero_terminal_snr),
        "ss_loss_type": objective.loss_type,
        "ss_huber_schedule": objective.huber_schedule,
        "ss_huber_c": str(objective.huber_c),
        "ss_huber_scale": str(objective.huber_scale),
        "ss_masked_loss": str(objective.masked_loss),
        "lora_train_timesteps": json.dumps(timestep_settings(objective)),
    }


def timestep_settings(objective: ObjectiveConfig) -> dict[str, object]:
    """The timestep range and distribution, with only the parameters that distribution takes."""
    settings: dict[str, object] = {
        "distribution": objective.timestep_distribution,
        "min_timestep": objective.min_timestep,
        "max_timestep": objective.max_timestep,
    }
    if objective.timestep_distribution == "logit_normal":
        settings.update(logit_mean=objective.logit_mean, logit_std=objective.logit_std)
    if objective.timestep_distribution == "shifted":
        settings["timestep_shift"] = objective.timestep_shift
    return settings


# The trainer that reads each type back, as `ss_network_module` names it: kohya sd-scripts' own modules for
# LoRA, LoCon and DyLoRA, LyCORIS' kohya entry point (lycoris/kohya.py) for the rest.
NETWORK_MODULES = {
    "lora": "networks.lora", "locon": "networks.lora", "dylora": "networks.dylora",
    "dora": "lycoris.kohya", "loha": "lycoris.kohya", "lokr": "lycoris.kohya",
}


def network_module_metadata(network: NetworkConfig) -> dict[str, str]:
    """`ss_network_module` and `ss_network_args` as kohya and LyCORIS write them for `network.type` (A1111 and
    civitai read the type from these), plus `lora_train_network_type` for our own reader."""
    return {
        "ss_network_module": NETWORK_MODULES[network.type],
        "ss_network_args": json.dumps(kohya_network_args(network)),
        "lora_train_network_type": network.type,
    }


def kohya_network_args(network: NetworkConfig) -> dict[str, str]:
    """The type's settings (`network_type_args`), block weights and LoRA+ ratios set, as kohya writes them into
    `ss_network_args` (its `--network_args` `key=value` strings, so a list is comma-separated); merge into that
    JSON mapping."""
    args = network_type_args(network)
    for field in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        value = getattr(network, field)
        if value is not None:
            args[field] = value if isinstance(value, str) else ",".join(str(weight) for weight in value)
    for field in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(network, field)
        if value is not None:
            args[field] = str(value)
    return args


def network_type_args(network: NetworkConfig) -> dict[str, str]:
    """The `--network_args` that make kohya's or LyCORIS' trainer build this network, under their names: kohya
    sd-scripts networks/lora.py and networks/dylora.py `create_network` (`conv_dim`, `conv_alpha`, the per-block
    lists, `rank_dropout`, `module_dropout`, `unit`), LyCORIS lycoris/kohya.py `create_network` (`algo`,
    `dora_wd`, `wd_on_output`, `factor`, `decompose_both`, `full_matrix`, `dropout`, `preset`). Empty for plain
    LoRA with no per-block rank or dropout, as kohya writes it."""
    args = {}
    if network.type in ("dora", "loha", "lokr"):
        args.update(_lycoris_args(network))
    if network.type == "dylora":
        args["unit"] = str(network.dylora_unit)
    if network.adapts_convolutions:
        # kohya's conv_alpha defaults to 1, not to alpha, so it is always written with conv_dim
        args.update(conv_dim=str(network.effective_conv_rank), conv_alpha=str(float(network.effective_conv_alpha)))
    for field in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        value = getattr(network, field)
        if value is not None:
            args[field] = ",".join(str(item) for item in value)
    for field in ("rank_dropout", "module_dropout"):
        if getattr(network, field):
            args[field] = str(getattr(network, field))
    return args


def _lycoris_args(network: NetworkConfig) -> dict[str, str]:
    """LyCORIS' `algo` and its settings; LyCORIS adapts every convolution unless told `preset=attn-mlp`, so a
    network without convolutions says so."""
    args = {"algo": network.type if network.type != "dora" else ("locon" if network.adapts_convolutions else "lora")}
    if not network.adapts_convolutions:
        args["preset"] = "attn-mlp"
    if network.type == "dora":
        args.update(dora_wd="True", wd_on_output="True")  # DoRA's magnitude: one per output row
    if network.type == "lokr":
        args["factor"] = str(network.lokr_factor)
        # LyCORIS reads decompose_both as given, so the string "False" would switch it on: written only when true
        if network.lokr_decompose_both:
            args["decompose_both"] = "True"
        if network.lokr_full_matrix:
            args["full_matrix"] = "True"
    if network.dropout:
        args["dropout"] = str(network.dropout)
    return args


def kohya_learning_rate_metadata(config: Config) -> dict[str, str]:
    """`ss_text_encoder_lr` as kohya writes it: the text encoders' rate, or `[te1, te2]` (as kohya's
    `--text_encoder_lr A B` writes it) when the two differ; empty when neither trains."""
    rates = [rate for part, rate in config.part_learning_rates.items() if part != "unet"]
    if not rates:
        return {"ss_text_encoder_lr": ""}
    return {"ss_text_encoder_lr": str(rates[0]) if len(set(rates)) == 1 else str(rates)}
