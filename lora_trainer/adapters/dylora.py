"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation", arXiv:2210.07558) on PEFT's LoRA layers, which have no such mode.

At each training forward an adapter draws a rank b from {u, 2u, ..., r} (u = `network.dylora_unit`, kohya's
`unit`) and computes with its first b ranks only, so the first b rows of down and columns of up learn to work
alone, for every b at once; afterwards the file cut to any of those ranks is a LoRA of its own
(`lora-train resize`). The truncation is the paper's (kohya's networks/dylora.py instead keeps every rank in
the forward and only trains the drawn one). The truncated update is scaled by alpha / r * sqrt(r / b), kohya's
DyLoRA scaling, so small ranks are not drowned out by the full-rank scale; the whole rank (b = r) is plain
LoRA's alpha / r. A file cut to rank N thus keeps its effect with alpha_N = alpha * sqrt(N / r).

Outside training the adapter computes at full rank, or at the rank `dylora_rank` sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from lora_trainer.adapters.lora import lora_layers


def dylora_alpha(alpha: float, full_rank: int, rank: int) -> float:
    """The alpha a rank-`rank` cut of a DyLoRA adapter needs to keep the effect it had in training."""
    return alpha * math.sqrt(rank / full_rank)


class DyLoraRank:
    """Forward hook on a down projection: keep its first b output ranks, scaled by sqrt(r / b)."""

    def __init__(self, rank: int, unit: int) -> None:
        self.rank = rank
        self.unit = unit
        self.evaluation_rank: int | None = None

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if module.training:
            # torch's CPU generator (not `random`), so gradient checkpointing's recompute draws the same rank
            kept = (int(torch.randint(self.rank // self.unit, ())) + 1) * self.unit
        else:
            kept = self.evaluation_rank or self.rank
        if kept >= self.rank:
            return None
        rank_axis = -1 if isinstance(module, torch.nn.Linear) else 1
        mask = torch.zeros(self.rank, device=output.device, dtype=output.dtype)
        mask[:kept] = math.sqrt(self.rank / kept)
        shape = [1] * output.dim()
        shape[rank_axis] = self.rank
        return output * mask.view(shape)


def add_dylora(model: torch.nn.Module, adapter_name: str, unit: int) -> None:
    for layer in lora_layers(model, adapter_name).values():
        if isinstance(layer, LoraLayer):
            down = layer.lora_A[adapter_name]
            hook = DyLoraRank(int(layer.r[adapter_name]), unit)
            down.register_forward_hook(hook)
            down.dylora_rank = hook  # found again by `dylora_rank`


@contextmanager
def dylora_rank(models: Iterable[torch.nn.Module], rank: int) -> Iterator[None]:
    """Inside the block, outside training, every DyLoRA adapter of `models` computes at `rank` (at most its own)."""
    hooks = [module.dylora_rank for model in models for module in model.modules() if isinstance(getattr(module, "dylora_rank", None), DyLoraRank)]
    try:
        for hook in hooks:
            hook.evaluation_rank = min(rank, hook.rank)
        yield
    finally:
        for hook in hooks:
            hook.evaluation_rank = None
