"""The optimizer's parameter groups: each part's learning rate, times the UNet's per-block weights, times LoRA+.

As kohya sd-scripts' `LoRANetwork.prepare_optimizer_params` (networks/lora.py) computes them: a UNet
adapter in block b (`model.blocks`, kohya's 23 SDXL blocks) learns at the UNet's rate times
`network.unet_block_lr_weights[b]`; an up matrix (PEFT's `lora_B`, kohya's `lora_up`) at that rate times
the part's LoRA+ ratio (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354). kohya makes one group per block; here adapters of a part with the same rate share a group,
so there are at most a few, named for TensorBoard's `lr/<name>`: `unet` (blocks at the UNet's rate),
`unet/block8+9` (blocks 8 and 9, which share another weight), `unet/lora_up` (LoRA+'s up matrices),
`text_encoder_1`, `text_encoder_2/lora_up`, ...

A block of weight 0 does not train. kohya leaves such adapters out of the network, hence out of the file;
here they stay in the file (as they started: zero, or the `init_weights` file's values) and
`freeze_unweighted_blocks` stops them training, so the file always has the same modules for a config's
rank and targets (which `init_weights` and resuming rely on), and gradient clipping and multi-GPU DDP see
only parameters that train.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lora_trainer.model.blocks import unet_block_index
from lora_trainer.adapters.lora import lora_layers
from lora_trainer.adapters.wiring import trainable_parameters
from lora_trainer.config.network import NetworkConfig
from lora_trainer.config.schema import Config

UP_MATRIX = "lora_B"  # PEFT's name of the up matrix, the one LoRA+ speeds up


def parameter_groups(trained: dict[str, torch.nn.Module], config: Config) -> list[dict[str, Any]]:
    """Groups `{"name", "params", "lr"}` over every trainable adapter parameter of the `trained` parts, one group
    per part and rate, in a fixed order (parts as given, then modules in model order; optimizer states rely on it).
    Adapters of rate 0 (a block of weight 0) are left out; `freeze_unweighted_blocks` should have frozen them."""
    groups: dict[tuple[str, float, bool], dict[str, Any]] = {}
    for part, model in trained.items():
        base_rate = config.part_learning_rates[part]
        for parameter, block, weight, up in _adapter_parameters(part, model, config.network):
            rate = base_rate * weight * (config.network.loraplus_ratio_of(part) if up else 1.0)
            if rate == 0:
                continue
            group = groups.setdefault((part, weight, up), {"params": [], "lr": rate, "blocks": set()})
            group["params"].append(parameter)
            group["blocks"].add(block)
    return [
        {"name": _group_name(part, weight, up, group.pop("blocks")), **group} for (part, weight, up), group in groups.items()
    ]


def freeze_unweighted_blocks(trained: dict[str, torch.nn.Module], network: NetworkConfig) -> int:
    """Stop the UNet adapters in blocks of weight 0 from training; call right after attaching the adapters, before
    the optimizer and Accelerate's wrapping. Returns how many adapted modules it froze."""
    weights = network.unet_block_lr_weights
    if weights is None or "unet" not in trained:
        return 0
    unet = trained["unet"]
    frozen = 0
    for path, layer in lora_layers(unet).items():
        if weights[unet_block_index(path, unet.config)] == 0:
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
            frozen += 1
    return frozen


def _adapter_parameters(
    part: str, model: torch.nn.Module, network: NetworkConfig
) -> Iterator[tuple[torch.nn.Parameter, int | None, float, bool]]:
    """(parameter, UNet block or None, block weight, whether an up matrix under LoRA+) of each trainable adapter
    parameter of `model`."""
    trainable = {id(parameter) for parameter in trainable_parameters(model)}
    block_weights = network.unet_block_lr_weights if part == "unet" else None
    loraplus = network.loraplus_ratio_of(part) != 1
    for path, layer in lora_layers(model).items():
        block = None if block_weights is None else unet_block_index(path, model.config)
        weight = 1.0 if block is None else block_weights[block]
        for name, parameter in layer.named_parameters():
            if id(parameter) in trainable:
                yield parameter, block, weight, loraplus and f"{UP_MATRIX}." in name


def _group_name(part: str, weight: float, up: bool, blocks: set[int | None]) -> str:
    """`unet`, `unet/block8+9` (blocks not at weight 1), `unet/lora_up` (LoRA+'s up matrices), `text_encoder_1`..."""
    name = part if weight == 1 else f"{part}/block" + "+".join(str(block) for block in sorted(blocks))
    return f"{name}/lora_up" if up else name
