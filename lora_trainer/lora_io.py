"""LoRA files in kohya's SDXL format, the one ComfyUI, A1111, Forge, kohya and diffusers all load.

Per adapted module three tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight` and a 0-d
`<name>.alpha` (the real alpha; scale = alpha / rank). `<name>` is a part prefix plus the module path
with dots turned into underscores:

- UNet, `lora_unet_`: the original SDXL block layout (`input_blocks_4_1_...`), see `unet_names`;
- CLIP-L, `lora_te1_` and CLIP-bigG, `lora_te2_`: always `text_model_encoder_layers_...`. transformers 5
  dropped the `text_model` level from `CLIPTextModel` but kept it in `CLIPTextModelWithProjection`;
  both are written with it, because ComfyUI, A1111 and Forge only map names that contain it.

The contract is `../shared/docs/lora-format.md`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lora_trainer.errors import UserError
from lora_trainer.files import write_bytes_atomic
from lora_trainer.lora import LoraWeights, attach_lora_weights
from lora_trainer.unet_names import ldm_module_path

PART_PREFIXES = {"unet": "lora_unet_", "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}
KEY_PATTERN = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class LoraFile:
    weights: dict[str, LoraWeights]  # by kohya module name, e.g. lora_te1_text_model_encoder_layers_0_mlp_fc1
    metadata: dict[str, str]


def kohya_module_name(part: str, module_path: str, model: torch.nn.Module) -> str | None:
    """The kohya name of a module of `model` (the UNet or a text encoder), or None if it has none."""
    if part == "unet":
        ldm_path = ldm_module_path(module_path, model.config)
        return None if ldm_path is None else PART_PREFIXES[part] + ldm_path.replace(".", "_")
    if part in ("text_encoder_1", "text_encoder_2"):
        path = module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"
        return PART_PREFIXES[part] + path.replace(".", "_")
    raise ValueError(f"unknown model part {part!r}")


def to_kohya_tensors(
    weights_by_part: Mapping[str, tuple[torch.nn.Module, Mapping[str, LoraWeights]]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Kohya-format tensors for each part's adapters; `weights_by_part[part] = (model, weights by module path)`."""
    tensors: dict[str, torch.Tensor] = {}
    for part, (model, weights) in weights_by_part.items():
        for module_path, module in weights.items():
            name = kohya_module_name(part, module_path, model)
            if name is None:
                raise ValueError(f"{part} module {module_path!r} has no name in kohya's SDXL format")
            tensors[f"{name}.lora_down.weight"] = module.down.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.lora_up.weight"] = module.up.detach().to("cpu", dtype).contiguous()
            # fp32 whatever the weights' dtype: an alpha like 0.3 is not exact in fp16.
            tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


def save_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write the file atomically, with `sshs_model_hash` computed as kohya does (SHA-256 of the data after the header)."""
    unhashed = save(tensors, dict(metadata))
    header_length = int.from_bytes(unhashed[:8], "little")
    model_hash = hashlib.sha256(unhashed[8 + header_length :]).hexdigest()
    write_bytes_atomic(path, save(tensors, {**metadata, "sshs_model_hash": model_hash}))


def read_lora_file(path: Path) -> LoraFile:
    """Read a kohya-format LoRA (through safetensors, never pickle) and group it by module."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: cannot read this LoRA file ({error}); give a .safetensors LoRA") from None
    names = sorted({key[: -len(suffix)] for key in tensors for suffix in _SUFFIXES if key.endswith(suffix)})
    weights = {}
    for name in names:
        if f"{name}.lora_down.weight" not in tensors or f"{name}.lora_up.weight" not in tensors:
            raise UserError(f"{path}: module {name} lacks lora_down or lora_up weights; the file is not a complete LoRA")
        down = tensors[f"{name}.lora_down.weight"].float()
        alpha_tensor = tensors.get(f"{name}.alpha")
        # kohya's rule: a missing alpha means alpha = rank (scale 1).
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(down.shape[0])
        weights[name] = LoraWeights(down=down, up=tensors[f"{name}.lora_up.weight"].float(), alpha=alpha)
    unknown = [key for key in tensors if not key.endswith(_SUFFIXES)]
    if unknown or not weights:
        raise UserError(f"{path}: not a kohya-format LoRA (unexpected key {unknown[0] if unknown else 'none'})")
    return LoraFile(weights=weights, metadata=dict(metadata))


def load_lora_into(models: Mapping[str, torch.nn.Module], lora: LoraFile, scale: float = 1.0, source: str = "") -> dict[str, int]:
    """Attach the file's adapters to the UNet / text encoders in `models` (by part); return modules per part."""
    counts = {}
    for part, weights in weights_by_module(models, lora, source).items():
        attach_lora_weights(models[part], weights, scale)
        counts[part] = len(weights)
    return counts


@torch.no_grad()
def merge_lora_into(models: Mapping[str, torch.nn.Module], lora: LoraFile, weight: float = 1.0, source: str = "") -> None:
    """Add the file's change, times `weight`, into the base weights: W += weight * alpha / rank * up @ down.

    Merged LoRAs stack (several files, each with its own weight) and cost nothing per step; weight 0
    leaves every weight exactly as it was.
    """
    for part, weights in weights_by_module(models, lora, source).items():
        modules = dict(models[part].named_modules())
        for module_path, module_weights in weights.items():
            base = modules[module_path].weight
            delta = module_weights.up.flatten(1) @ module_weights.down.flatten(1)
            scale = weight * module_weights.alpha / module_weights.rank
            base += (scale * delta).reshape(base.shape).to(base.device, base.dtype)


def weights_by_module(
    models: Mapping[str, torch.nn.Module], lora: LoraFile, source: str
) -> dict[str, dict[str, LoraWeights]]:
    """The file's weights per part, keyed by module path; an error if a module is not in the models."""
    remaining = dict(lora.weights)
    grouped = {}
    for part, model in models.items():
        by_kohya_name = _kohya_names(part, model)
        prefix = PART_PREFIXES[part]
        weights = {}
        for name in [name for name in remaining if name.startswith(prefix)]:
            if name not in by_kohya_name:
                raise UserError(f"{source}: module {name} does not exist in this model; is it an SDXL LoRA for this base?")
            weights[by_kohya_name[name]] = remaining.pop(name)
        grouped[part] = weights
    if remaining:
        raise UserError(f"{source}: {len(remaining)} modules fit none of the loaded models, e.g. {next(iter(remaining))}")
    return grouped


def _kohya_names(part: str, model: torch.nn.Module) -> dict[str, str]:
    """kohya name -> module path, for every linear and conv layer of `model`."""
    names = {}
    for module_path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            name = kohya_module_name(part, module_path, model)
            if name is not None:
                names[name] = module_path
    return names
