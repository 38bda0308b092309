"""A model's adapters as file-layout weights, and file-layout weights attached to a model as live adapters.

Attached adapters stay live, not merged into the base: several files stack, each under its own adapter name,
and all of them can be switched off at once for a side-by-side with the base. Stacked files add their updates:
each adapter adds its own to what the layer computes before it (LoHa and LoKr layers wrap the layer they are
attached to; LoRA adapters share one PEFT LoRA layer, which runs them in its active order). DoRA rescales what
it is given, so DoRA files are attached first (`load_loras_into`) and run first (`activate_every_adapter`):
the others' updates then add to DoRA's. Two DoRA files on one module stack only approximately, in order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from lora_trainer.adapters.attach import inject_adapters
from lora_trainer.adapters.lora import ADAPTER_NAME, activate_every_adapter, lora_layers, lora_parameters
from lora_trainer.adapters.targets import ModuleSetting
from lora_trainer.adapters.weights import AdapterWeights, layer_weights, load_layer_weights


def read_lora_weights(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, AdapterWeights]:
    """The adapters' current weights in the file's layout, by module path."""
    return {path: layer_weights(layer, adapter_name) for path, layer in lora_layers(model, adapter_name).items()}


def attach_lora_weights(
    model: torch.nn.Module, weights: Mapping[str, AdapterWeights], scale: float = 1.0, adapter_name: str = ADAPTER_NAME
) -> None:
    """Attach adapters to exactly the modules in `weights` (by module path) and load them; `scale` is the
    strength, as UIs apply it: the update times `scale` (for DoRA: W + scale * (W' - W))."""
    if not weights:
        return
    by_kind: dict[str, dict[str, AdapterWeights]] = defaultdict(dict)
    for path, module in weights.items():
        by_kind["dora" if module.has_dora else module.kind][path] = module
    for kind, group in by_kind.items():
        targets = {path: ModuleSetting(module.rank or 1, module.alpha) for path, module in group.items()}
        inject_adapters(model, kind, targets, adapter_name)
    layers = lora_layers(model, adapter_name)
    for path, module in weights.items():
        load_layer_weights(layers[path], adapter_name, module)
        if scale != 1.0:
            _apply_strength(layers[path], adapter_name, scale, module.has_dora)
    for parameter in lora_parameters(model, adapter_name):
        parameter.data = parameter.data.float()
    activate_every_adapter(model)


def _apply_strength(layer: torch.nn.Module, adapter_name: str, strength: float, dora: bool) -> None:
    if dora:
        layer.lora_magnitude_vector[adapter_name].register_forward_hook(DoraStrength(strength))
    else:
        layer.scaling[adapter_name] = layer.scaling[adapter_name] * strength


class DoraStrength:
    """Forward hook on PEFT's DoRA magnitude module, which returns what DoRA adds to the base output,
    (W' - W) x: times s, that is W + s (W' - W), the UIs' strength s. DoRA is not linear in its weights, so
    no weight can be scaled instead."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.strength
