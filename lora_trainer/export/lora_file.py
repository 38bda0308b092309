"""LoRA files in kohya's SDXL format, the one ComfyUI, A1111, Forge, kohya and diffusers all load: tensors
in and out, written atomically, read through safetensors only.

Per adapted module three tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight` and a 0-d
`<name>.alpha` (the real alpha; scale = alpha / rank), `<name>` as `kohya_names` spells it. The format,
and how we prove that each UI loads it, is docs/lora-format.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lora_trainer.adapters.lora import LoraWeights
from lora_trainer.errors import UserError
from lora_trainer.export.kohya_names import kohya_module_name
from lora_trainer.files import write_bytes_atomic

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraFile:
    weights: dict[str, LoraWeights]  # by kohya module name, e.g. lora_te1_text_model_encoder_layers_0_mlp_fc1
    metadata: dict[str, str]


def to_kohya_tensors(
    weights_by_part: Mapping[str, tuple[torch.nn.Module, Mapping[str, LoraWeights]]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Kohya-format tensors for each part's adapters; `weights_by_part[part] = (model, weights by module path)`.

    The weights are cast to `dtype`, or to fp32 when `dtype` would overflow them (see `cast_tensors`): the
    dtype of the returned weights is the one the file is saved in."""
    weights_tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, torch.Tensor] = {}
    for part, (model, weights) in weights_by_part.items():
        for module_path, module in weights.items():
            name = kohya_module_name(part, module_path, model)
            if name is None:
                raise ValueError(f"{part} module {module_path!r} has no name in kohya's SDXL format")
            weights_tensors[f"{name}.lora_down.weight"] = module.down
            weights_tensors[f"{name}.lora_up.weight"] = module.up
            # fp32 whatever the weights' dtype: an alpha like 0.3 is not exact in fp16.
            alphas[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    cast = cast_tensors(weights_tensors, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for key in weights_tensors:  # each module's down, up, alpha together, as before
        tensors[key] = cast[key]
        if key.endswith(".lora_up.weight"):
            alpha_key = key.removesuffix(".lora_up.weight") + ".alpha"
            tensors[alpha_key] = alphas[alpha_key]
    return tensors


def cast_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors on the CPU in `dtype`; in fp32 instead, with a warning, if the cast makes a finite tensor
    non-finite (fp16 tops out at 65504). Tensors that were not finite to begin with are cast as asked."""
    cast = {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in tensors.items()}
    if dtype == torch.float32:
        return cast
    overflowed = sum(
        1 for key, tensor in cast.items() if not bool(torch.isfinite(tensor).all()) and bool(torch.isfinite(tensors[key]).all())
    )
    if not overflowed:
        return cast
    name = next((known for known, value in SAVE_DTYPES.items() if value == dtype), str(dtype).removeprefix("torch."))
    log.warning(
        "%d of %d tensors overflow %s; saving this LoRA in fp32 instead (output.save_dtype: %s)", overflowed, len(cast), name, name
    )
    return {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in tensors.items()}


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
