"""LoRA through PEFT: attach adapters to a model, list their parameters, read their weights and load weights in.

Adapters are attached with PEFT's own `inject_adapter_in_model` (not transformers' `add_adapter`,
which on transformers 5.24 demands an unreleased PEFT). Adapter weights are kept in fp32 even when
the frozen base weights are fp16/bf16, so optimizer updates are not lost to rounding.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
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
    adapter_name: str = ADAPTER_NAME,
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
    with warnings.catch_warnings():
        # PEFT warns that a second adapter on one model is unusual; stacking LoRAs to sample is exactly that.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for parameter in lora_parameters(model, adapter_name):
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The adapted modules of `model` by module path (the path of the layer they wrap)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_parameters(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> list[torch.nn.Parameter]:
    return [
        parameter
        for layer in lora_layers(model).values()
        for adapters in (layer.lora_A, layer.lora_B)
        if adapter_name in adapters
        for parameter in adapters[adapter_name].parameters()
    ]


def read_lora_weights(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, LoraWeights]:
    """The adapters' current weights by module path."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {
        path: LoraWeights(
            down=state[f"{path}.lora_A.weight"], up=state[f"{path}.lora_B.weight"], alpha=float(layer.lora_alpha[adapter_name])
        )
        for path, layer in lora_layers(model).items()
        if adapter_name in layer.lora_A
    }


def attach_lora_weights(
    model: torch.nn.Module, weights: dict[str, LoraWeights], scale: float = 1.0, adapter_name: str = ADAPTER_NAME
) -> None:
    """Attach adapters to exactly the modules in `weights` and load them; `scale` multiplies their effect.

    Adapters attached under several names all act at once, so LoRAs loaded one after another stack.
    """
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
        adapter_name=adapter_name,
    )
    state = {}
    for path, module in weights.items():
        state[f"{path}.lora_A.weight"] = module.down
        state[f"{path}.lora_B.weight"] = module.up * scale
    unexpected = set_peft_model_state_dict(model, state, adapter_name=adapter_name).unexpected_keys
    if unexpected:
        raise ValueError(f"adapter weights for modules the model does not have, e.g. {unexpected[0]}")
    _activate_every_adapter(model)


@contextmanager
def adapters_disabled(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside the block the models compute exactly as their base layers, every adapter switched off."""
    layers = [layer for model in models for layer in lora_layers(model).values()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _activate_every_adapter(model: torch.nn.Module) -> None:
    # PEFT makes the newest adapter the only active one; the ones loaded before it must keep acting too.
    names = sorted({name for layer in lora_layers(model).values() for name in layer.lora_A})
    for layer in lora_layers(model).values():
        layer.set_adapter(names)
