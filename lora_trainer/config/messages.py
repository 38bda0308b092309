"""Config errors as one line per problem: the field, what is wrong, what is allowed, and where a renamed field went."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

# Option names kohya sd-scripts users bring with them, and where that setting lives here.
KOHYA_NAMES = {
    "pretrained_model_name_or_path": "model.pretrained",
    "v_parameterization": "model.prediction_type: v_prediction",
    "train_data_dir": "datasets.0.path",
    "caption_extension": "datasets.N.caption_extension",
    "num_repeats": "datasets.N.repeats",
    "network_dim": "network.rank",
    "torch_compile": "training.compile",
    "dynamo_backend": "training.compile_backend",
    "network_alpha": "network.alpha",
    "network_dropout": "network.dropout",
    "network_weights": "network.init_weights",
    "network_module": "network.type (lora, locon, loha, lokr, dora, dylora)",
    "network_args": "network.* (conv_dim is network.conv_rank, algo is network.type, factor is network.lokr_factor)",
    "conv_dim": "network.conv_rank (with network.type: locon)",
    "algo": "network.type",
    "factor": "network.lokr_factor",
    "unit": "network.dylora_unit",
    "dora_wd": "network.type: dora",
    "save_state": "output.save_state_every_n_epochs",
    "save_last_n_epochs": "output.keep_saves",
    "save_last_n_steps": "output.keep_saves",
    "save_last_n_epochs_state": "output.keep_states",
    "network_train_unet_only": "network.train_text_encoder_1 / train_text_encoder_2: false",
    "text_encoder_lr": "network.text_encoder_learning_rate (two rates: text_encoder_1_learning_rate, text_encoder_2_learning_rate)",
    "learning_rate_te1": "network.text_encoder_1_learning_rate",
    "learning_rate_te2": "network.text_encoder_2_learning_rate",
    "down_lr_weight": "network.down_lr_weight",
    "mid_lr_weight": "network.mid_lr_weight",
    "up_lr_weight": "network.up_lr_weight",
    "block_lr": "network.down_lr_weight / mid_lr_weight / up_lr_weight (factors of training.learning_rate)",
    "loraplus_lr_ratio": "network.loraplus_lr_ratio",
    "loraplus_unet_lr_ratio": "network.loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio": "network.loraplus_text_encoder_lr_ratio",
    "scale_weight_norms": "network.scale_weight_norms",
    "unet_lr": "training.learning_rate",
    "train_batch_size": "training.batch_size",
    "max_train_steps": "training.max_steps",
    "max_train_epochs": "training.epochs",
    "optimizer_type": "training.optimizer",
    "debiased_estimation_loss": "objective.debiased_estimation",
    "noise_offset": "objective.noise_offset",
    "noise_offset_random_strength": "objective.noise_offset_random_strength",
    "multires_noise_iterations": "objective.multires_noise_iterations",
    "multires_noise_discount": "objective.multires_noise_discount",
    "ip_noise_gamma": "objective.ip_noise_gamma",
    "min_timestep": "objective.min_timestep",
    "max_timestep": "objective.max_timestep",
    "min_snr_gamma": "objective.min_snr_gamma",
    "loss_type": "objective.loss_type",
    "huber_c": "objective.huber_c",
    "huber_schedule": "objective.huber_schedule",
    "zero_terminal_snr": "objective.zero_terminal_snr",
    "masked_loss": "objective.masked_loss",
    "conditioning_data_dir": "datasets.N.mask_dir (for loss masks)",
    "lr_scheduler_min_lr_ratio": "training.lr_scheduler_min_lr_ratio",
    "lr_scheduler_power": "training.lr_scheduler_power",
    "lr_scheduler_num_cycles": "training.lr_scheduler_num_cycles",
        "output_name": "output.name",
    "output_dir": "output.dir",
    "save_precision": "output.save_dtype",
    "resolution": "data.resolution",
    "enable_bucket": "data.buckets",
    "bucket_reso_steps": "data.bucket_step",
    "min_bucket_reso": "data.min_bucket_side",
    "max_bucket_reso": "data.max_bucket_side",
    "bucket_no_upscale": "data.bucket_no_upscale",
    "cache_latents_to_disk": "data.cache_latents (always on disk here)",
    "cache_text_encoder_outputs": "data.cache_text_embeddings",
    "vae_batch_size": "data.vae_batch_size",
    "max_token_length": "data.max_token_length",
    "reg_data_dir": "a datasets entry with is_reg: true",
    "prior_loss_weight": "datasets.N.loss_weight (of the is_reg entry)",
    "shuffle_caption": "datasets.N.shuffle_tags",
    "caption_separator": "datasets.N.tag_separator",
    "caption_dropout_rate": "datasets.N.caption_dropout",
    "caption_tag_dropout_rate": "datasets.N.tag_dropout",
    "image_dir": "datasets.N.path",
    "keep_tokens": "datasets.N.keep_tokens",
    "flip_aug": "datasets.N.flip_aug",
    "random_crop": "datasets.N.random_crop (with data.cache_latents: false)",
    "caption_prefix": "datasets.N.caption_prefix",
    "caption_suffix": "datasets.N.caption_suffix",
    "class_tokens": "datasets.N.class_tokens",
}

# Fields of ours that were renamed, by their old path (list indices left out), and their new name.
RENAMED_FIELDS = {
    "sample.cfg_scale": "sample.guidance_scale",
    "training.betas": "training.adam_betas",
    "training.epsilon": "training.adam_epsilon",
}


def format_config_errors(
    error: ValidationError, root: type[BaseModel], source: str | None, field_names: dict[str, str] | None = None
) -> str:
    """One line per problem, e.g. `network.rank: must be a positive integer, got -4`, each after `source: `.

    `field_names` renames top-level fields, for models filled from command-line options.
    """
    lines = [_format_one(details, root, field_names or {}) for details in error.errors()]
    return "\n".join(f"{source}: {line}" if source else line for line in lines)


def _format_one(details: dict[str, Any], root: type[BaseModel], field_names: dict[str, str]) -> str:
    location = [str(part) for part in details["loc"]]
    kind = details["type"]
    context = details.get("ctx") or {}
    value = details.get("input")
    declared = _annotation_at(location, root)
    if location and location[0] in field_names:
        location = [field_names[location[0]], *location[1:]]

    if kind == "extra_forbidden":
        return f"{_dotted(location)}: {_unknown_field_message(location, root)}"
    if kind == "missing":
        return f"{_dotted(location)}: is required"
    if kind == "value_error":
        message = str(context.get("error", details["msg"]))
        # A cross-field rule names the field it blames as "field: reason".
        named = re.match(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.*)$", message, re.S)
        if named:
            return f"{_dotted([*location, *named.group(1).split('.')])}: {named.group(2)}"
        return f"{_dotted(location)}: {message}"
    if kind == "greater_than" and context.get("gt") == 0:
        expected = "a positive integer" if declared in (int, int | None) else "greater than 0"
        return f"{_dotted(location)}: must be {expected}, got {_show(value)}"
    return f"{_dotted(location)}: {_describe(kind, context, details['msg'])}, got {_show(value)}"


def _describe(kind: str, context: dict[str, Any], fallback: str) -> str:
    descriptions = {
        "greater_than": lambda: f"must be greater than {context.get('gt')}",
        "greater_than_equal": lambda: f"must be at least {context.get('ge')}",
        "less_than": lambda: f"must be less than {context.get('lt')}",
        "less_than_equal": lambda: f"must be at most {context.get('le')}",
        "literal_error": lambda: f"must be one of {context.get('expected', '').replace(chr(39), '')}",
        "int_parsing": lambda: "must be an integer",
        "int_type": lambda: "must be an integer",
        "int_from_float": lambda: "must be a whole number",
        "float_parsing": lambda: "must be a number",
        "float_type": lambda: "must be a number",
        "bool_parsing": lambda: "must be true or false",
        "bool_type": lambda: "must be true or false",
        "string_type": lambda: "must be a text string",
        "path_type": lambda: "must be a path",
        "list_type": lambda: "must be a list (in YAML, entries starting with '- ')",
        "tuple_type": lambda: "must be a list",
        "too_short": lambda: f"must have at least {_entries(context.get('min_length'))}",
        "too_long": lambda: f"must have at most {_entries(context.get('max_length'))}",
        "model_type": lambda: "must be a mapping of fields",
        "model_attributes_type": lambda: "must be a mapping of fields",
        "dict_type": lambda: "must be a mapping of fields",
    }
    describe = descriptions.get(kind)
    return describe() if describe else fallback[:1].lower() + fallback[1:]


def _entries(count: Any) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(location: list[str]) -> str:
    return ".".join(location) if location else "config"


def _unknown_field_message(location: list[str], root: type[BaseModel]) -> str:
    name = location[-1]
    allowed = _fields_at(location[:-1], root)
    message = f"unknown field {name!r}"
    renamed = RENAMED_FIELDS.get(".".join(part for part in location if not part.isdigit()))
    if renamed:
        return f"{message}; it was renamed to {renamed}"
    if name in KOHYA_NAMES:
        return f"{message}; kohya's {name} is {KOHYA_NAMES[name]} here"
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return f"{message} (allowed: {', '.join(allowed)})" if allowed else message


def _fields_at(location: list[str], root: type[BaseModel]) -> list[str]:
    """The field names of the model found at `location` (list indices skipped), or [] if none."""
    model = _model_in(_annotation_at(location, root))
    return list(model.model_fields) if model is not None else []


def _annotation_at(location: list[str], root: type[BaseModel]) -> Any:
    """The declared type of the field at `location` (list indices skipped), or None if there is none."""
    annotation: Any = root
    for part in location:
        if part.isdigit():
            continue
        model = _model_in(annotation)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return annotation


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `annotation`, looking through list[...] and Optional[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
