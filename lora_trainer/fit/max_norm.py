"""Max-norm regularisation of the adapters (kohya sd-scripts' `--scale_weight_norms`).

The max-norm constraint of Srivastava et al. 2014 ("Dropout: a simple way to prevent neural networks from
overfitting", JMLR 15) applied per adapter as kohya's `LoRANetwork.apply_max_norm_regularization`
(networks/lora.py) does: the update an adapter adds, delta = up @ down * scale (scale = alpha / rank, PEFT's
`scaling`), is measured by its Frobenius norm; above `max_norm`, down and up are both multiplied by
sqrt(max_norm / norm), which scales delta to norm `max_norm` exactly.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from lora_trainer.adapters.lora import ADAPTER_NAME, lora_layers


@torch.no_grad()
def apply_max_norm(models: dict[str, torch.nn.Module], max_norm: float) -> tuple[int, float, float]:
    """Scale every trainable adapter of `models` whose update's norm exceeds `max_norm` back to it; call after each
    optimizer step. Returns what kohya logs: (adapters scaled, mean and largest norm after scaling)."""
    scaled, norms = 0, []
    for model in models.values():
        pairs = _trainable_pairs(model)
        if not pairs:
            continue
        before = torch.stack([update_norm(down, up, scale) for down, up, scale in pairs])
        # One ratio per adapter, 1 where the norm is within the bound, so no value has to reach the host here.
        ratios = (max_norm / before).clamp(max=1.0)
        for (down, up, _), ratio in zip(pairs, ratios.sqrt()):
            down.mul_(ratio)
            up.mul_(ratio)
        scaled += int((ratios < 1).sum())
        norms.append((before * ratios).cpu())
    if not norms:
        return 0, 0.0, 0.0
    after = torch.cat(norms)
    return scaled, after.mean().item(), after.max().item()


def _trainable_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(down, up, scale) of each adapter of `model` that trains; frozen ones (CLIP-L's last layer, blocks of
    weight 0) keep their weights."""
    pairs = []
    for layer in lora_layers(model, ADAPTER_NAME).values():
        if isinstance(layer, LoraLayer):  # LoHa and LoKr are refused with max-norm (config.network)
            down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            if down.requires_grad or up.requires_grad:
                pairs.append((down, up, layer.scaling[ADAPTER_NAME]))
    return pairs


def update_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """||scale * up @ down||_F for down [rank, in(, kh, kw)] and up [out, rank(, 1, 1)], without forming the
    out x in matrix: ||B A||_F^2 = sum((B^T B) * (A A^T)), two rank x rank products."""
    a, b = down.flatten(1).float(), up.flatten(1).float()
    return abs(scale) * ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()
