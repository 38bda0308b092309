"""A saved LoRA file back into live PEFT adapters on the UNet and text encoders: the reverse of the export.

Live adapters, not weights merged into the base: each file keeps its own adapter, so several stack with
their own weights, can be switched off for a side-by-side comparison, and every adapter type PEFT knows
is loaded the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lora_trainer.adapters.lora import ADAPTER_NAME
from lora_trainer.adapters.weights import AdapterWeights
from lora_trainer.adapters.model_weights import attach_lora_weights
from lora_trainer.errors import UserError
from lora_trainer.export.kohya_names import PART_PREFIXES, kohya_names
from lora_trainer.export.lora_file import LoraFile


def load_loras_into(
    models: Mapping[str, torch.nn.Module], loras: Sequence[tuple[LoraFile, float, str]]
) -> list[dict[str, int]]:
    """Attach each `(file, scale, source)` as its own adapter, all acting at once; return modules per part, per file.

    Every file is matched against the bare models before any adapter is attached, so a file that does not
    fit fails before anything changes. DoRA files go on first, beneath the others, so that the others' updates
    add to what DoRA computes rather than being rescaled by it (`adapters.model_weights`).
    """
    names = {part: kohya_names(part, model) for part, model in models.items()}
    grouped = [weights_by_module(names, lora, source) for lora, _, source in loras]
    dora_first = sorted(range(len(loras)), key=lambda index: not any(module.has_dora for module in loras[index][0].weights.values()))
    for index in dora_first:
        adapter_name = ADAPTER_NAME if len(loras) == 1 else f"lora_{index}"
        for part, weights in grouped[index].items():
            try:
                attach_lora_weights(models[part], weights, loras[index][1], adapter_name)
            except ValueError as error:
                raise UserError(f"{loras[index][2]}: does not fit this base model ({error}); is it an SDXL LoRA for this base?") from None
    return [{part: len(weights) for part, weights in by_part.items()} for by_part in grouped]


def weights_by_module(names: Mapping[str, Mapping[str, str]], lora: LoraFile, source: str) -> dict[str, dict[str, AdapterWeights]]:
    """The file's weights per part, keyed by module path (`names[part]`: kohya name -> module path)."""
    remaining = dict(lora.weights)
    grouped = {}
    for part, by_kohya_name in names.items():
        weights = {}
        for name in [name for name in remaining if name.startswith(PART_PREFIXES[part])]:
            if name not in by_kohya_name:
                raise UserError(f"{source}: module {name} does not exist in this model; is it an SDXL LoRA for this base?")
            weights[by_kohya_name[name]] = remaining.pop(name)
        grouped[part] = weights
    if remaining:
        raise UserError(f"{source}: {len(remaining)} modules fit none of the loaded models, e.g. {next(iter(remaining))}")
    return grouped
