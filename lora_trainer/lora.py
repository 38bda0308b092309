"""A thin layer over PEFT: attach LoRA adapters, list their parameters, read and write their weights.

Adapters are attached with PEFT's own `inject_adapter_in_model` (not transformers' `add_adapter`,
which on transformers 5.24 demands an unreleased PEFT). Adapter weights are kept in fp32 even when
the frozen base weights are fp16/bf16, so optimizer updates are not lost to rounding.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

ADAPTER_NAME = "default"

# kohya's default SDXL targets: every linear layer inside the UNet's transformer blocks.
UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# Keep this set whole: diffusers fails to recognise a file whose text-encoder part is partial.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoraWeights:
    """One adapted module: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)], and alpha (scale = alpha / rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def attach_lora(
    model: torch.nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> None:
    """Wrap every module of `model` whose name ends with one of `targets` in a trainable LoRA adapter.

    `rank_pattern` / `alpha_pattern` give single modules (by full path) another rank or alpha.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        rank_pattern={re.escape(name): value for name, value in (rank_pattern or {}).items()},
        alpha_pattern={re.escape(name): value for name, value in (alpha_pattern or {}).items()},
        init_lora_weights=True,  # down: Kaiming-uniform, up: zeros, so training starts at the base model
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for parameter in lora_parameters(model):
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The adapted modules of `model` by module path (the path of the layer they wrap)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [
        parameter
        for layer in lora_layers(model).values()
        for adapters in (layer.lora_A, layer.lora_B)
        if ADAPTER_NAME in adapters
        for parameter in adapters[ADAPTER_NAME].parameters()
    ]


def read_lora_weights(model: torch.nn.Module) -> dict[str, LoraWeights]:
    """The adapters' current weights by module path."""
    weights = {}
    for name, layer in lora_layers(model).items():
        weights[name] = LoraWeights(
            down=layer.lora_A[ADAPTER_NAME].weight.detach(),
            up=layer.lora_B[ADAPTER_NAME].weight.detach(),
            alpha=float(layer.lora_alpha[ADAPTER_NAME]),
        )
    return weights


def attach_lora_weights(model: torch.nn.Module, weights: dict[str, LoraWeights], scale: float = 1.0) -> None:
    """Attach adapters to exactly the modules in `weights` and load them; `scale` multiplies their effect."""
    if not weights:
        return
    rank = Counter(module.rank for module in weights.values()).most_common(1)[0][0]
    alpha = Counter(module.alpha for module in weights.values()).most_common(1)[0][0]
    attach_lora(
        model,
        list(weights),  # full module paths, so each name matches only itself
        rank,
        alpha,
        rank_pattern={name: module.rank for name, module in weights.items() if module.rank != rank},
        alpha_pattern={name: module.alpha for name, module in weights.items() if module.alpha != alpha},
    )
    layers = lora_layers(model)
    with torch.no_grad():
        for name, module_weights in weights.items():
            layer = layers[name]
            layer.lora_A[ADAPTER_NAME].weight.copy_(module_weights.down)
            layer.lora_B[ADAPTER_NAME].weight.copy_(module_weights.up * scale)
