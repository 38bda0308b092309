"""kohya's rank and module dropout (sd-scripts networks/lora.py, `LoRAModule.forward`) on PEFT's LoRA layers,
which have neither (PEFT's LoHa and LoKr have their own, used as they are).

- Rank dropout: during training each rank of the down projection's output is zeroed with probability p, per
  sample, and the kept ones are scaled by 1 / (1 - p), as kohya scales the adapter by `scale / (1 - p)`.
- Module dropout: during training the whole adapter is skipped with probability p at each forward, its module
  computing as the base layer alone (DoRA's magnitude included, as in kohya and LyCORIS).

Both draw from torch's random generators, which gradient checkpointing restores before it recomputes a
forward, so the recomputed pass drops exactly what the first one did.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from lora_trainer.adapters.lora import lora_layers


def add_lora_dropouts(model: torch.nn.Module, adapter_name: str, rank_dropout: float, module_dropout: float) -> None:
    """Hook rank and module dropout into every PEFT LoRA layer of `model` that holds `adapter_name`."""
    for layer in lora_layers(model, adapter_name).values():
        if not isinstance(layer, LoraLayer):
            continue
        if rank_dropout:
            layer.lora_A[adapter_name].register_forward_hook(RankDropout(rank_dropout))
        if module_dropout:
            skip = ModuleDropout(module_dropout)
            layer.register_forward_pre_hook(skip.before)
            layer.register_forward_hook(skip.after)


class RankDropout:
    """Forward hook on a down projection: drop ranks of its output, per sample, kept ones scaled by 1 / (1 - p)."""

    def __init__(self, probability: float) -> None:
        self.probability = probability

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        rank = output.shape[-1] if isinstance(module, torch.nn.Linear) else output.shape[1]
        kept = torch.rand(output.shape[0], rank, device=output.device) > self.probability
        if output.dim() == 3:  # [batch, tokens, rank]
            kept = kept[:, None, :]
        elif output.dim() == 4:  # a conv's [batch, rank, height, width]
            kept = kept[:, :, None, None]
        return output * kept.to(output.dtype) / (1 - self.probability)


class ModuleDropout:
    """Pre- and post-forward hooks on a PEFT layer: skip all its adapters for this forward with probability p.

    PEFT's layers compute as their base layer while `_disable_adapters` is set; setting it directly, rather than
    through `enable_adapters`, leaves the adapters' `requires_grad` alone. An adapter already switched off by
    someone else is left so.
    """

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.skipping = False

    def before(self, layer: LoraLayer, inputs: tuple) -> None:
        if layer.training and not layer._disable_adapters and bool(torch.rand(()) < self.probability):
            layer._disable_adapters = True
            self.skipping = True

    def after(self, layer: LoraLayer, inputs: tuple, output: torch.Tensor) -> None:
        if self.skipping:
            layer._disable_adapters = False
            self.skipping = False
