"""kohya's rank and module dropout and DyLoRA's drawn rank, on PEFT layers, against their formulas.

Each is checked on a linear and a 3x3 conv layer: what one training forward computes must be the formula for
some draw, every draw must occur, the rank dropout's 1 / (1 - p) must keep the mean output, evaluation must be
untouched, and gradient checkpointing's recomputed forward must draw what the first one drew.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lora_trainer.adapters.attach import attach_network
from lora_trainer.adapters.dylora import dylora_alpha, dylora_rank
from lora_trainer.adapters.lora import ADAPTER_NAME, layer_parameters, lora_parameters
from lora_trainer.adapters.targets import ModuleSetting
from lora_trainer.config.network import NetworkConfig

RANK, ALPHA = 4, 3.0


class Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 12)
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1)


def _adapted(**network) -> Pair:
    torch.manual_seed(0)
    model = Pair()
    settings = {"linear": ModuleSetting(RANK, ALPHA), "conv": ModuleSetting(RANK, ALPHA)}
    attach_network(model, settings, NetworkConfig(rank=RANK, alpha=ALPHA, **network))
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.normal_()
    return model


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"linear": torch.randn(3, 5, 16, generator=generator), "conv": torch.randn(3, 8, 6, 6, generator=generator)}


def _down_up(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[ADAPTER_NAME].weight.detach(), layer.lora_B[ADAPTER_NAME].weight.detach()


def _adapter_output(layer, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """base(x) + alpha / r * up(kept * down(x)): `kept` is [batch, rank] (or [rank]) of per-rank factors."""
    down, up = _down_up(layer)
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Linear):
        hidden = x @ down.T
        factors = kept[:, None, :] if kept.dim() == 2 else kept
        return base(x) + (hidden * factors) @ up.T * (ALPHA / RANK)
    hidden = torch.nn.functional.conv2d(x, down, padding=1)
    factors = kept[:, :, None, None] if kept.dim() == 2 else kept[None, :, None, None]
    return base(x) + torch.nn.functional.conv2d(hidden * factors, up) * (ALPHA / RANK)


@pytest.mark.parametrize("module", ["linear", "conv"])
def test_rank_dropout_drops_ranks_per_sample_and_keeps_the_mean(module):
    p = 0.5
    model = _adapted(rank_dropout=p)
    layer, x = getattr(model, module), _inputs()[module]
    with torch.no_grad():
        model.eval()
        full = layer(x)
        torch.testing.assert_close(full, _adapter_output(layer, x, torch.ones(RANK)))
        model.train()
        seen = set()
        for _ in range(100):
            out = layer(x)
            # Recover each sample's kept ranks: the formula must hold for one of the 2^r masks.
            for sample in range(x.shape[0]):
                matches = [
                    mask for mask in range(2**RANK)
                    if torch.allclose(
                        out[sample : sample + 1],
                        _adapter_output(layer, x[sample : sample + 1], _mask(mask)[None] / (1 - p)),
                        atol=1e-4, rtol=1e-4,
                    )
                ]
                assert matches, "no choice of kept ranks explains this output"
                seen.add(matches[0])
        assert len(seen) == 2**RANK, sorted(seen)
        mean = torch.stack([layer(x) for _ in range(400)]).mean(0)
    # The 1 / (1 - p) rescale keeps the expectation (without it the mean would be half-way to the base: error 0.5).
    update = full - layer.get_base_layer()(x)
    assert (mean - full).norm() / update.norm() < 0.15


def _mask(bits: int) -> torch.Tensor:
    return torch.tensor([(bits >> rank) & 1 for rank in range(RANK)], dtype=torch.float32)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_module_dropout_computes_the_base_alone_or_the_whole_adapter(kind):
    model = _adapted(type=kind, module_dropout=0.5)
    x = _inputs()["linear"]
    layer = model.linear
    with torch.no_grad():
        model.eval()
        adapted = layer(x)
        base = layer.get_base_layer()(x)
        assert (adapted - base).abs().max() > 1e-3
        model.train()
        outcomes = []
        for _ in range(40):
            out = layer(x)
            if torch.allclose(out, base, atol=1e-6):
                outcomes.append("skipped")
            else:
                torch.testing.assert_close(out, adapted)
                outcomes.append("adapted")
    assert 5 < outcomes.count("skipped") < 35, outcomes
    assert all(parameter.requires_grad for parameter in lora_parameters(model)), "module dropout must not freeze adapters"


@pytest.mark.parametrize("network", [{"rank_dropout": 0.5, "module_dropout": 0.3}, {"type": "dylora", "dylora_unit": 1}])
def test_gradient_checkpointing_recomputes_the_same_draws(network):
    model = _adapted(**network)
    model.train()
    x = _inputs()["conv"].requires_grad_(True)  # so a forward whose adapter is skipped still has a graph

    def forward(inputs):
        return model.conv(inputs).square().sum()

    skipped = set()
    for seed in range(8):
        grads = []
        for use_checkpoint in (False, True):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            loss = checkpoint(forward, x, use_reentrant=False) if use_checkpoint else forward(x)
            loss.backward()
            grads.append([None if parameter.grad is None else parameter.grad.clone() for parameter in layer_parameters(model.conv).values()])
        for plain, checkpointed in zip(*grads):
            assert (plain is None) == (checkpointed is None)
            if plain is not None:
                torch.testing.assert_close(checkpointed, plain)
        skipped.add(grads[0][0] is None)
    if network.get("module_dropout"):
        assert skipped == {True, False}, "the seeds should cover a skipped and an adapted forward"


@pytest.mark.parametrize("module", ["linear", "conv"])
def test_dylora_trains_nested_ranks_with_kohyas_scale(module):
    unit = 2
    model = _adapted(type="dylora", dylora_unit=unit)
    layer, x = getattr(model, module), _inputs()[module]

    def at_rank(rank: int) -> torch.Tensor:
        kept = torch.zeros(RANK)
        kept[:rank] = math.sqrt(RANK / rank)
        return _adapter_output(layer, x, kept)

    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(layer(x), at_rank(RANK))
        with dylora_rank([model], 2):
            torch.testing.assert_close(layer(x), at_rank(2))
        torch.testing.assert_close(layer(x), at_rank(RANK))
        model.train()
        seen = set()
        for _ in range(30):
            out = layer(x)
            ranks = [rank for rank in range(unit, RANK + 1, unit) if torch.allclose(out, at_rank(rank), atol=1e-5, rtol=1e-5)]
            assert len(ranks) == 1, "each forward computes with exactly one of the unit's multiples"
            seen.add(ranks[0])
    assert seen == {2, 4}


def test_a_cut_keeps_the_effect_with_the_rewritten_alpha():
    # At rank n the adapter adds up[:, :n] down[:n] * alpha / r * sqrt(r / n); as a rank-n LoRA that is alpha_n / n.
    for full, rank in ((8, 2), (16, 4), (32, 32)):
        assert math.isclose(dylora_alpha(ALPHA, full, rank) / rank, ALPHA / full * math.sqrt(full / rank))
