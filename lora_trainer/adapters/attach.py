"""Attach adapters of each type through PEFT: the config per type, then what PEFT lacks, added on top.

`lora`, `locon`, `dylora`: PEFT's `LoraConfig`; `dora`: the same with `use_dora`; `loha`: `LoHaConfig`;
`lokr`: `LoKrConfig`. PEFT has no DyLoRA, no rank or module dropout for LoRA, and no LoKr `full_matrix`;
`adapters.dropout`, `adapters.dylora` and `_make_lokr_factors_full` add them on the PEFT layers.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer

from lora_trainer.adapters.dropout import add_lora_dropouts
from lora_trainer.adapters.dylora import add_dylora
from lora_trainer.adapters.lora import ADAPTER_NAME, lora_layers, lora_parameters
from lora_trainer.adapters.targets import ModuleSetting
from lora_trainer.config.network import NetworkConfig

# The PEFT layer family each network type trains with.
PEFT_KIND = {"lora": "lora", "locon": "lora", "dylora": "lora", "dora": "dora", "loha": "loha", "lokr": "lokr"}


def attach_network(
    model: torch.nn.Module, targets: Mapping[str, ModuleSetting], network: NetworkConfig, adapter_name: str = ADAPTER_NAME
) -> None:
    """Wrap every module in `targets` (module path -> rank and alpha) in a trainable adapter of `network.type`."""
    kind = PEFT_KIND[network.type]
    inject_adapters(
        model, kind, targets, adapter_name,
        dropout=network.dropout,
        rank_dropout=network.rank_dropout if kind in ("loha", "lokr") else 0.0,
        module_dropout=network.module_dropout if kind in ("loha", "lokr") else 0.0,
        lokr_factor=network.lokr_factor,
        lokr_decompose_both=network.lokr_decompose_both,
    )
    if kind in ("lora", "dora"):
        add_lora_dropouts(model, adapter_name, network.rank_dropout, network.module_dropout)
    if network.type == "dylora":
        add_dylora(model, adapter_name, network.dylora_unit)
    if network.type == "loha":
        _initialise_loha_as_lycoris(model, adapter_name)
    if network.type == "lokr" and network.lokr_full_matrix:
        _make_lokr_factors_full(model, adapter_name)
    make_trainable(model, adapter_name)


def make_trainable(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> None:
    """The adapter's parameters in fp32 (updates are not lost to a fp16/bf16 base's rounding) and trainable."""
    for parameter in lora_parameters(model, adapter_name):
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)


def inject_adapters(
    model: torch.nn.Module,
    kind: str,
    targets: Mapping[str, ModuleSetting],
    adapter_name: str,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    lokr_factor: int = -1,
    lokr_decompose_both: bool = False,
) -> None:
    """PEFT adapters of one layer family (`lora`, `dora`, `loha`, `lokr`) on exactly the modules in `targets`."""
    rank = Counter(setting.rank for setting in targets.values()).most_common(1)[0][0]
    alpha = Counter(setting.alpha for setting in targets.values()).most_common(1)[0][0]
    common = {
        "target_modules": list(targets),  # full module paths, so each name matches only itself
        "rank_pattern": _patterns({path: setting.rank for path, setting in targets.items() if setting.rank != rank}),
        "alpha_pattern": _patterns({path: setting.alpha for path, setting in targets.items() if setting.alpha != alpha}),
    }
    if kind in ("lora", "dora"):
        # down: Kaiming-uniform, up: zeros, so training starts at the base model
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=kind == "dora", init_lora_weights=True, **common)
    elif kind == "loha":
        config = LoHaConfig(r=rank, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout, **common)
    elif kind == "lokr":
        config = LoKrConfig(
            r=rank, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout, rank_dropout_scale=True,
            decompose_factor=lokr_factor, decompose_both=lokr_decompose_both, init_weights="lycoris", **common,
        )
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    with warnings.catch_warnings():
        # PEFT warns that a second adapter on one model is unusual; stacking LoRAs to sample is exactly that.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def _patterns(values: Mapping[str, float]) -> dict[str, float]:
    """One PEFT pattern per distinct value, matching exactly its modules' paths. PEFT tries every pattern on every
    target, and past Python's 512 cached regexes it recompiles them each time: one pattern per module made
    SDXL with per-block ranks take minutes to attach."""
    paths_by_value: dict[float, list[str]] = {}
    for path, value in values.items():
        paths_by_value.setdefault(value, []).append(path)
    return {"(?:" + "|".join(re.escape(path) for path in paths) + ")": value for value, paths in paths_by_value.items()}


def _initialise_loha_as_lycoris(model: torch.nn.Module, adapter_name: str) -> None:
    """LyCORIS' LoHa start (modules/loha.py): w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0. PEFT's
    Kaiming start makes w1_a @ w1_b about 30x smaller at SDXL's widths, so the learning rates LoHa users
    know from LyCORIS would barely move it; the update still starts at 0."""
    with torch.no_grad():
        for layer in lora_layers(model, adapter_name).values():
            if isinstance(layer, LoHaLayer):
                layer.hada_w1_a[adapter_name].normal_(std=0.1)
                layer.hada_w1_b[adapter_name].normal_(std=1.0)
                layer.hada_w2_a[adapter_name].zero_()
                layer.hada_w2_b[adapter_name].normal_(std=1.0)


def _make_lokr_factors_full(model: torch.nn.Module, adapter_name: str) -> None:
    """LyCORIS' LoKr `full_matrix`: both Kronecker factors full matrices, the larger one starting at 0, and the
    update's scale 1 (there is no rank to divide alpha by). PEFT only makes a factor full when the rank is large
    enough, so its low-rank pair is replaced here."""
    for layer in lora_layers(model, adapter_name).values():
        if not isinstance(layer, LoKrLayer):
            continue
        base = layer.get_base_layer().weight
        if adapter_name in layer.lokr_w1_a:
            w1 = layer.lokr_w1_a[adapter_name] @ layer.lokr_w1_b[adapter_name]
            del layer.lokr_w1_a[adapter_name], layer.lokr_w1_b[adapter_name]
            layer.lokr_w1[adapter_name] = torch.nn.Parameter(torch.empty_like(w1.detach()))
            torch.nn.init.kaiming_uniform_(layer.lokr_w1[adapter_name], a=math.sqrt(5))
        if adapter_name in layer.lokr_w2_a:
            rows = layer.lokr_w2_a[adapter_name].shape[0]
            kernel = tuple(base.shape[2:])
            columns = layer.lokr_w2_b[adapter_name].shape[1] // max(1, math.prod(kernel))
            del layer.lokr_w2_a[adapter_name], layer.lokr_w2_b[adapter_name]
            layer.lokr_w2[adapter_name] = torch.nn.Parameter(base.new_zeros(rows, columns, *kernel))
        layer.scaling[adapter_name] = 1.0


def attach_lora(
    model: torch.nn.Module, suffixes: Sequence[str], rank: int, alpha: float, dropout: float = 0.0, adapter_name: str = ADAPTER_NAME
) -> None:
    """Plain trainable LoRA on every linear or conv layer whose path ends with one of `suffixes`, all at one rank
    and alpha (benchmarks and tests; training goes through `attach_network`)."""
    targets = {
        path: ModuleSetting(rank, alpha)
        for path, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(path == suffix or path.endswith(f".{suffix}") for suffix in suffixes)
    }
    inject_adapters(model, "lora", targets, adapter_name, dropout=dropout)
    make_trainable(model, adapter_name)
