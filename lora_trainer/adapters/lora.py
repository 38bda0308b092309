"""Adapters through PEFT, every type alike: find them on a model, list their parameters, switch them off.

Adapters are attached with PEFT's own `inject_adapter_in_model` (not transformers' `add_adapter`, which on
transformers 5.24 demands an unreleased PEFT); `adapters.attach` builds the config of each type. Adapter
weights are kept in fp32 even when the frozen base weights are fp16/bf16, so optimizer updates are not lost
to rounding.

A module adapted by several loaded files holds several PEFT layers, each wrapping the one before as its
`base_layer`; `module_path` strips those levels, so every layer is known by the path of the module it adapts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER_NAME = "default"

# kohya's default SDXL targets: every linear layer inside the UNet's transformer blocks.
UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# Keep this set whole: diffusers fails to recognise a file whose text-encoder part is partial.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

_WRAPPED = ".base_layer"


def module_path(layer_path: str) -> str:
    """The path of the module a PEFT layer adapts: its own path without the levels stacked adapters add."""
    return layer_path.replace(_WRAPPED, "")


def lora_layers(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, BaseTunerLayer]:
    """The PEFT layers of `model` (LoRA, DoRA, LoHa, LoKr alike) by the path of the module each adapts; only
    those holding `adapter_name` when it is given (without one, stacked layers share a path: the outermost wins)."""
    layers: dict[str, BaseTunerLayer] = {}
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and (adapter_name is None or adapter_name in module.r):
            layers.setdefault(module_path(path), module)
    return layers


def all_lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every PEFT layer of `model`, stacked ones included."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def layer_parameters(layer: BaseTunerLayer, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """The parameters of one adapter in one PEFT layer by PEFT's name (`lora_A`, `hada_w1_a`, `lokr_w1`, ...),
    whatever the type: they live in PEFT's per-adapter dicts, so `adapter_name` is a component of their names."""
    parameters = {}
    for name, parameter in layer.named_parameters():
        parts = name.split(".")
        if parts[0] != "base_layer" and adapter_name in parts:
            parameters[parts[0]] = parameter
    return parameters


def lora_parameters(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> list[torch.nn.Parameter]:
    return [parameter for layer in lora_layers(model, adapter_name).values() for parameter in layer_parameters(layer, adapter_name).values()]


@contextmanager
def adapters_disabled(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside the block the models compute exactly as their base layers, every adapter switched off."""
    layers = [layer for model in models for layer in all_lora_layers(model)]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def activate_every_adapter(model: torch.nn.Module) -> None:
    """Every adapter acts: PEFT makes the newest one the only active one. DoRA adapters run first, on the bare
    base output, so that the others' updates add to theirs rather than being rescaled by them."""
    for layer in all_lora_layers(model):
        dora = getattr(layer, "use_dora", {})
        layer.set_adapter(sorted(layer.r, key=lambda name: (not dora.get(name, False), name)))
