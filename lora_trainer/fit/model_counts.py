"""What the memory estimate needs to know about the configured model, counted without its weights.

Each part is built from its config on the meta device (`torch.device("meta")`: shapes, no memory, no file
read but the config), and counted there: its parameters, the weights of its Linear and Conv layers (what a
quantized base shrinks), the adapters the config's `network` puts on it, and how many values its layers
output in one forward (the width its activations scale with).

Where the configs come from: a diffusers folder (the shipped `builtin:shapes-sdxl` is one) gives its
`unet/`, `text_encoder/`, `text_encoder_2/` and `vae/` config.json; `builtin:tiny-sdxl` is built from the
functions that build it, whether or not it has been built yet; a single-file checkpoint takes its
`model.config` folder, else SDXL base 1.0's configs shipped with the package (`model/pretrained/sdxl-base`),
as loading it does; a hub id is not looked up (a plan reads nothing from the network) and is taken to have
SDXL base 1.0's layout, which every SDXL checkpoint on the hub shares.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_trainer.config.model import BUILTIN_PREFIX, ModelConfig, is_model_file
from lora_trainer.config.network import NetworkConfig
from lora_trainer.errors import UserError
from lora_trainer.fit.memory_estimate import SDXL_UNET_ACTIVATION_ELEMENTS, ModelCounts, PartCounts
from lora_trainer.model.sdxl_architecture import SDXL_UNET
from lora_trainer.model.sources import SDXL_BASE_CONFIG

PARTS = ("unet", "text_encoder_1", "text_encoder_2")
SUBFOLDERS = {"unet": "unet", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2", "vae": "vae"}
# The UNet's activation width is counted at 1024 px, the size the memory coefficients were measured at.
REFERENCE_LATENT_SIDE = 1024 // 8
CAPTION_TOKENS = 77


@dataclass
class _MetaModel:
    unet: Any
    text_encoder_1: Any
    text_encoder_2: Any
    vae: Any
    source: str


def count_model(model: ModelConfig, network: NetworkConfig) -> ModelCounts:
    """The counts of the configured base with `network`'s adapters on the parts that train; nothing is loaded."""
    built = _meta_model(model)
    trains = {"unet": network.train_unet, "text_encoder_1": network.train_text_encoder_1, "text_encoder_2": network.train_text_encoder_2}
    counts = {}
    for part in PARTS:
        module = getattr(built, part)
        counts[part] = _part_counts(part, module, network if trains[part] else None)
    return ModelCounts(**counts, vae_parameters=_parameters(built.vae), source=built.source)


def _part_counts(part: str, model: torch.nn.Module, network: NetworkConfig | None) -> PartCounts:
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    convolution = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    adapters = adapter_counts(part, model, network) if network is not None else (0, 0, 0)
    return PartCounts(
        parameters=_parameters(model),
        matrix_weights=linear + convolution,
        linear_weights=linear,
        # A frozen text encoder keeps no activations for a backward pass.
        activation_elements=activation_elements(part, model) if part == "unet" or network is not None else 0,
        adapter_parameters=adapters[0],
        frozen_adapter_parameters=adapters[1],
        adapted_weights=adapters[2],
    )


def adapter_counts(part: str, model: torch.nn.Module, network: NetworkConfig) -> tuple[int, int, int]:
    """(trainable adapter parameters, adapters that never train, weights of the adapted modules) on `model`.

    The modules are the run's own (`adapter_targets`), and each kind of module is attached with the run's
    own code (`attach_network`) once, on a meta stand-in of its shape: exact for every network type, and
    quick where attaching to all of SDXL's 722 modules would take seconds.
    """
    from lora_trainer.adapters.attach import attach_network
    from lora_trainer.adapters.lora import layer_parameters, lora_layers
    from lora_trainer.adapters.targets import adapter_targets

    targets = adapter_targets(part, model, network)
    if not targets:
        return 0, 0, 0
    modules = dict(model.named_modules())
    # CLIP-L's last layer feeds nothing SDXL reads, so its adapters are frozen (`wiring._freeze_last_layer_adapters`).
    last_layer = f"layers.{model.config.num_hidden_layers - 1}." if part == "text_encoder_1" else None
    kinds = Counter((_shape(modules[path]), setting, bool(last_layer and last_layer in path)) for path, setting in targets.items())
    stand_ins = torch.nn.Module()
    with torch.device("meta"):
        for index, (shape, _, _) in enumerate(kinds):
            stand_ins.add_module(f"module_{index}", _stand_in(shape))
    attach_network(stand_ins, {f"module_{index}": setting for index, (_, setting, _) in enumerate(kinds)}, network)
    layers = lora_layers(stand_ins)
    trained = frozen = weights = 0
    for index, ((shape, _, never_trains), count) in enumerate(kinds.items()):
        size = sum(parameter.numel() for parameter in layer_parameters(layers[f"module_{index}"]).values())
        if never_trains:
            frozen += size * count
        else:
            trained += size * count
        weights += _weight_size(shape) * count
    return trained, frozen, weights


def activation_elements(part: str, model: torch.nn.Module) -> int:
    """The values `model`'s layers output in one forward on the meta device (nothing is computed): one 1024 px
    image through the UNet, one 77-token caption through a text encoder."""
    if part == "unet" and has_sdxl_layout(model.config):
        return SDXL_UNET_ACTIVATION_ELEMENTS
    total = 0

    def count(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [module for module in model.modules() if not any(True for _ in module.children())]
    hooks = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.no_grad(), torch.device("meta"):
            if part == "unet":
                _unet_forward(model)
            else:
                model(input_ids=torch.zeros(1, CAPTION_TOKENS, dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def has_sdxl_layout(unet_config: Any) -> bool:
    """Whether a UNet config has SDXL base 1.0's blocks and widths (the image size it was saved with aside)."""
    return all(_same(unet_config.get(key), value) for key, value in SDXL_UNET.items() if key != "sample_size")


def _unet_forward(unet: torch.nn.Module) -> None:
    config = unet.config
    side = REFERENCE_LATENT_SIDE
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    unet(
        torch.zeros(1, config.in_channels, side, side),
        torch.zeros(1),
        torch.zeros(1, CAPTION_TOKENS, config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.zeros(1, pooled_width), "time_ids": torch.zeros(1, 6)},
    )


def _meta_model(model: ModelConfig) -> _MetaModel:
    reference = model.pretrained
    if reference == f"{BUILTIN_PREFIX}tiny-sdxl":
        return _tiny_sdxl()
    if reference.startswith(BUILTIN_PREFIX):
        from lora_trainer.model.builtin import builtin_model_path  # shipped, not built: only its path is read

        folder = builtin_model_path(reference[len(BUILTIN_PREFIX) :])
        return _from_folder(folder, "model.pretrained", f"{reference}'s configs")
    if is_model_file(reference):
        location = model.config
        if location and Path(location).is_dir():
            return _from_folder(Path(location), "model.config", f"the configs in model.config ({location})")
        where = " (model.config is a hub id, not looked up)" if location else ""
        return _from_folder(SDXL_BASE_CONFIG, "model.config", f"SDXL base 1.0's configs, as for any single-file checkpoint{where}")
    if Path(reference).is_dir():
        return _from_folder(Path(reference), "model.pretrained", f"the configs in {reference}")
    return _from_folder(SDXL_BASE_CONFIG, "model.pretrained", "SDXL base 1.0's configs (a hub id is not looked up; SDXL's layout assumed)")


def _from_folder(folder: Path, field: str, source: str) -> _MetaModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = {}
    for part, subfolder in SUBFOLDERS.items():
        path = folder / subfolder / "config.json"
        if not path.is_file():
            raise UserError(
                f"{field}: {path} not found; a diffusers folder holds unet/, text_encoder/, text_encoder_2/ and vae/, "
                "each with its config.json"
            )
        configs[part] = path.parent
    with torch.device("meta"):
        return _MetaModel(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs["unet"])),
            text_encoder_1=CLIPTextModel(CLIPTextConfig.from_pretrained(configs["text_encoder_1"])),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs["text_encoder_2"])),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs["vae"])),
            source=source,
        )


def _tiny_sdxl() -> _MetaModel:
    from lora_trainer.model import builtin

    with torch.device("meta"):  # the calls `builtin.build_tiny_sdxl` makes, so it need not be built
        text_encoder_1, text_encoder_2 = builtin.clip_vocabulary_text_encoders()
        return _MetaModel(
            unet=builtin.tiny_unet(),
            text_encoder_1=text_encoder_1,
            text_encoder_2=text_encoder_2,
            vae=builtin.tiny_vae(),
            source="builtin:tiny-sdxl's recipe (lora_trainer/model/builtin.py)",
        )


def _shape(module: torch.nn.Module) -> tuple:
    if isinstance(module, torch.nn.Linear):
        return ("linear", module.in_features, module.out_features)
    return ("conv", module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride), module.padding)


def _stand_in(shape: tuple) -> torch.nn.Module:
    if shape[0] == "linear":
        return torch.nn.Linear(shape[1], shape[2])
    return torch.nn.Conv2d(shape[1], shape[2], shape[3], stride=shape[4], padding=shape[5])


def _weight_size(shape: tuple) -> int:
    if shape[0] == "linear":
        return shape[1] * shape[2]
    return shape[1] * shape[2] * shape[3][0] * shape[3][1]


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _same(given: Any, expected: Any) -> bool:
    if isinstance(expected, (tuple, list)):
        return isinstance(given, (tuple, list)) and list(given) == list(expected)
    return given == expected
