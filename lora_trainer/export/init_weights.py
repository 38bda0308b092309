"""Start freshly attached adapters from an existing LoRA file's weights (`network.init_weights`, kohya's
`--network_weights`).

Why: kohya users continue a LoRA on new data (more images, another concept, a second pass at a lower learning
rate) by starting a new run from the old file's weights, with a fresh optimizer and schedule. That is not a
resume: no optimizer state, step count or data position comes along, only the adapters' down and up weights.

The file must fit the run exactly: the same rank and alpha, on modules the run adapts. Anything else is a
one-line `UserError` naming the file, the module and the setting to change, before any weight is copied.
Adapted modules the file lacks keep their fresh initialisation (up = 0, so they start at the base model), with
one warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_trainer.adapters.lora import ADAPTER_NAME, lora_layers
from lora_trainer.adapters.weights import AdapterWeights, layer_weights, load_layer_weights
from lora_trainer.errors import UserError
from lora_trainer.export.kohya_names import PART_PREFIXES, kohya_module_name
from lora_trainer.export.lora_file import read_lora_file

log = logging.getLogger(__name__)

FIELD = "network.init_weights"


def load_initial_weights(trained: Mapping[str, torch.nn.Module], path: Path | None) -> None:
    """Copy the LoRA file's down/up weights into the adapters of `trained` (part name -> model with our
    adapters attached, as `attach_adapters` returns it), in place; nothing to do when `path` is None.

    Every module of the file is checked against the run before any weight is copied.
    """
    if path is None:
        return
    lora = read_lora_file(path)
    _check_parts_trained(lora.weights, trained, path)
    plan: list[tuple[torch.nn.Module, AdapterWeights, str]] = []
    missing: list[str] = []
    for part, model in trained.items():
        layers = _adapted_by_kohya_name(part, model)
        prefix = PART_PREFIXES[part]
        in_file = {name: weights for name, weights in lora.weights.items() if name.startswith(prefix)}
        unknown = [name for name in in_file if name not in layers]
        if unknown:
            raise UserError(_unknown_module_message(path, part, model, unknown))
        for name, layer in layers.items():
            if name not in in_file:
                missing.append(name)
                continue
            plan.append((layer, _checked(path, name, layer, in_file[name]), name))
    for layer, weights, _ in plan:
        load_layer_weights(layer, ADAPTER_NAME, weights)  # keeps the parameters' dtype (fp32) and device
    if missing:
        log.warning(
            "%s: %s has no weights for %d adapted modules, e.g. %s; they start fresh",
            FIELD, path, len(missing), missing[0],
        )
    log.info("started the adapters from %s: %d modules", path, len(plan))


def _check_parts_trained(weights: Mapping[str, AdapterWeights], trained: Mapping[str, torch.nn.Module], path: Path) -> None:
    for part, prefix in PART_PREFIXES.items():
        if part in trained:
            continue
        names = [name for name in weights if name.startswith(prefix)]
        if names:
            raise UserError(
                f"{FIELD}: {path} has {part} weights ({len(names)} modules, e.g. {names[0]}) but network.train_{part} "
                f"is false; set network.train_{part}: true"
            )
    leftover = [name for name in weights if not name.startswith(tuple(PART_PREFIXES.values()))]
    if leftover:
        raise UserError(f"{FIELD}: {path} has module {leftover[0]}, which is no SDXL UNet or text-encoder module; give an SDXL LoRA")


def _adapted_by_kohya_name(part: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    adapted = {}
    for module_path, layer in lora_layers(model, ADAPTER_NAME).items():
        name = kohya_module_name(part, module_path, model)
        if name is not None:
            adapted[name] = layer
    return adapted


def _unknown_module_message(path: Path, part: str, model: torch.nn.Module, unknown: list[str]) -> str:
    """Tell a module the run does not adapt (other targets) from one the model does not have (another base)."""
    existing = set()
    for module_path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in module_path:
            name = kohya_module_name(part, module_path.removesuffix(".base_layer"), model)
            if name is not None:
                existing.add(name)
    name = unknown[0]
    if name in existing:
        return (
            f"{FIELD}: {path} has weights for {name} ({len(unknown)} such modules), which this run does not adapt; "
            f"a file with convolutions (LoCon) needs network.type: locon or network.conv_rank, and per-block ranks the same block_dims"
        )
    return f"{FIELD}: {path} has module {name} ({len(unknown)} such modules), which this model does not have; is it an SDXL LoRA for this base?"


def _checked(path: Path, name: str, layer: torch.nn.Module, weights: AdapterWeights) -> AdapterWeights:
    ours = layer_weights(layer, ADAPTER_NAME)
    kind, theirs = _type_name(ours), _type_name(weights)
    if kind != theirs:
        raise UserError(f"{FIELD}: {path} is a {theirs} at {name}, the config trains {kind}; set network.type to match the file")
    if ours.kind != "lora":
        return _checked_layout(path, name, ours, weights)
    rank = ours.rank
    alpha = ours.alpha
    if weights.rank != rank:
        raise UserError(f"{FIELD}: {path} has rank {weights.rank} at {name}, the config trains rank {rank}; set network.rank: {weights.rank}")
    if not math.isclose(weights.alpha, alpha, rel_tol=1e-6):
        raise UserError(
            f"{FIELD}: {path} has alpha {weights.alpha:g} at {name}, the config trains alpha {alpha:g}; set network.alpha: {weights.alpha:g}"
        )
    down, up = ours.down, ours.up
    if not (_fits(weights.down, down.shape) and _fits(weights.up, up.shape)):
        raise UserError(
            f"{FIELD}: {path} has down {list(weights.down.shape)} / up {list(weights.up.shape)} at {name}, the model needs "
            f"{list(down.shape)} / {list(up.shape)}; is it an SDXL LoRA for this base model?"
        )
    return weights


def _type_name(weights: AdapterWeights) -> str:
    return "DoRA" if weights.has_dora else {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[weights.kind]


def _checked_layout(path: Path, name: str, ours: AdapterWeights, weights: AdapterWeights) -> AdapterWeights:
    """A LoHa or LoKr fits when it has the same tensors in the same shapes and the same scale."""
    shapes = {key: list(tensor.shape) for key, tensor in ours.tensors.items()}
    theirs = {key: list(tensor.shape) for key, tensor in weights.tensors.items()}
    if shapes != theirs:
        raise UserError(
            f"{FIELD}: {path} has {theirs} at {name}, the config trains {shapes}; set network.rank (and the LoKr settings) as the file was trained"
        )
    if not math.isclose(weights.scale, ours.scale, rel_tol=1e-6) and ours.rank is not None:
        raise UserError(
            f"{FIELD}: {path} has alpha {weights.alpha:g} at {name}, the config trains alpha {ours.alpha:g}; set network.alpha: {weights.alpha:g}"
        )
    return weights


def _fits(tensor: torch.Tensor, shape: torch.Size) -> bool:
    """The file's tensor has the parameter's shape, allowing kohya's 1x1-conv spelling [out, in, 1, 1] of a linear layer."""
    if tensor.shape == shape:
        return True
    return tensor.dim() == len(shape) + 2 and tensor.shape[:2] == shape and tensor.shape[2:] == (1, 1)
