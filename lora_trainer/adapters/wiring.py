"""Which parts of SDXL get adapters, on which layers, and which of their parameters train."""

from __future__ import annotations

import torch

from lora_trainer.adapters.attach import attach_network
from lora_trainer.adapters.lora import lora_layers, lora_parameters
from lora_trainer.adapters.targets import adapter_targets
from lora_trainer.config.network import NetworkConfig


def attach_adapters(parts: dict[str, torch.nn.Module], network: NetworkConfig) -> dict[str, torch.nn.Module]:
    """Attach adapters of `network.type` to the parts (by part name) switched on in the config; return those
    parts by name."""
    switched_on = {"unet": network.train_unet, "text_encoder_1": network.train_text_encoder_1, "text_encoder_2": network.train_text_encoder_2}
    trained = {part: parts[part] for part, on in switched_on.items() if on}
    for part, model in trained.items():
        attach_network(model, adapter_targets(part, model, network), network)
    if "text_encoder_1" in trained:
        _freeze_last_layer_adapters(trained["text_encoder_1"])
    return trained


def describe_adapters(trained: dict[str, torch.nn.Module], network: NetworkConfig) -> str:
    """One line for the log: the type, its size, and how many modules and parameters each part adapts."""
    size = f"rank {network.rank}, alpha {network.alpha:g}"
    if network.adapts_convolutions:
        size += f"; convolutions rank {network.effective_conv_rank}, alpha {network.effective_conv_alpha:g}"
    parts = ", ".join(
        f"{part} {len(lora_layers(model))} modules ({sum(p.numel() for p in trainable_parameters(model)):,} parameters)"
        for part, model in trained.items()
    )
    return f"adapters: {network.type} ({size}): {parts}"


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in lora_parameters(model) if parameter.requires_grad]


def _freeze_last_layer_adapters(text_encoder_1: torch.nn.Module) -> None:
    """SDXL reads CLIP-L's penultimate layer, so the last layer's adapters can never get a gradient.

    They stay in the file (kohya writes them too, as zeros) but do not train: an optimizer has nothing
    to do there, and multi-GPU DDP fails on trainable parameters that no step uses.
    """
    last_layer = f"layers.{text_encoder_1.config.num_hidden_layers - 1}."
    for name, layer in lora_layers(text_encoder_1).items():
        if last_layer in name:
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
