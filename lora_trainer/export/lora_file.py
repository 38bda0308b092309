"""LoRA files in kohya's SDXL format, the one ComfyUI, A1111, Forge, kohya and diffusers all load, with
LyCORIS' keys for the types beyond LoRA: tensors in and out, written atomically, read through safetensors only.

Per adapted module, `<name>` as `kohya_names` spells it: `<name>.lora_down.weight`, `<name>.lora_up.weight`
(LoRA, LoCon, DyLoRA; plus `<name>.dora_scale` for DoRA), or LyCORIS' `<name>.hada_w1_a` ... (LoHa) and
`<name>.lokr_w1` ... (LoKr), each with a 0-d `<name>.alpha` (the real alpha). The format, and how we prove that
each UI loads it, is docs/lora-format.md.
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

from lora_trainer.adapters.weights import LOHA_KEYS, WEIGHT_KEYS, AdapterWeights
from lora_trainer.errors import UserError
from lora_trainer.export.kohya_names import kohya_module_name
from lora_trainer.files import write_bytes_atomic

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SUFFIXES = tuple(f".{key}" for key in (*WEIGHT_KEYS, "alpha"))
# LyCORIS layouts this trainer neither writes nor reads: Tucker cores, and the algorithms beyond the five.
_UNSUPPORTED = {"lora_mid.weight": "a Tucker (use_tucker) LoCon", "hada_t1": "a Tucker LoHa", "hada_t2": "a Tucker LoHa",
                "lokr_t1": "a Tucker LoKr", "lokr_t2": "a Tucker LoKr", "diff": "a full fine-tune (algo=full)",
                "oft_blocks": "an OFT", "oft_diag": "an OFT", "weight": "an (IA)^3", "a1.weight": "a GLoRA"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraFile:
    weights: dict[str, AdapterWeights]  # by kohya module name, e.g. lora_te1_text_model_encoder_layers_0_mlp_fc1
    metadata: dict[str, str]


def to_kohya_tensors(
    weights_by_part: Mapping[str, tuple[torch.nn.Module, Mapping[str, AdapterWeights]]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Kohya-format tensors for each part's adapters; `weights_by_part[part] = (model, weights by module path)`.

    The weights are cast to `dtype`, or to fp32 when `dtype` would overflow them (see `cast_tensors`): the
    dtype of the returned weights is the one the file is saved in."""
    weights_tensors: dict[str, torch.Tensor] = {}
    keys_of: dict[str, list[str]] = {}
    for part, (model, weights) in weights_by_part.items():
        for module_path, module in weights.items():
            name = kohya_module_name(part, module_path, model)
            if name is None:
                raise ValueError(f"{part} module {module_path!r} has no name in kohya's SDXL format")
            keys_of[name] = [f"{name}.{key}" for key in module.tensors]
            weights_tensors.update({f"{name}.{key}": tensor for key, tensor in module.tensors.items()})
            # fp32 whatever the weights' dtype: an alpha like 0.3 is not exact in fp16.
            keys_of[name].append(f"{name}.alpha")
            weights_tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    alphas = [key for key in weights_tensors if key.endswith(".alpha")]
    cast = cast_tensors({key: tensor for key, tensor in weights_tensors.items() if not key.endswith(".alpha")}, dtype)
    cast.update({key: weights_tensors[key] for key in alphas})
    return {key: cast[key] for keys in keys_of.values() for key in keys}  # each module's tensors and alpha together


def _module_of(key: str) -> str | None:
    return next((key[: -len(suffix)] for suffix in _SUFFIXES if key.endswith(suffix)), None)


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
    unknown = [key for key in tensors if not key.endswith(_SUFFIXES)]
    for key in unknown:
        layout = next((what for suffix, what in _UNSUPPORTED.items() if key.endswith(f".{suffix}")), None)
        if layout is not None:
            raise UserError(f"{path}: {key} is part of {layout} file, which lora-train does not read; give a LoRA, LoCon, DoRA, LoHa or LoKr")
    if unknown:
        raise UserError(f"{path}: not a kohya-format LoRA (unexpected key {unknown[0]})")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = _module_of(key)
        grouped.setdefault(name, {})[key[len(name) + 1 :]] = tensor
    weights = {name: _module_weights(path, name, group) for name, group in sorted(grouped.items())}
    if not weights:
        raise UserError(f"{path}: not a kohya-format LoRA (no adapter weights in it)")
    return LoraFile(weights=weights, metadata=dict(metadata))


def _module_weights(path: Path, name: str, group: dict[str, torch.Tensor]) -> AdapterWeights:
    """One module's tensors, checked to be a complete LoRA, LoHa or LoKr."""
    alpha_tensor = group.pop("alpha", None)
    tensors = {key: tensor.float() for key, tensor in group.items()}
    if "hada_w1_a" in tensors or any(key in tensors for key in LOHA_KEYS):
        needed = [LOHA_KEYS]
    elif any(key.startswith("lokr_") for key in tensors):
        needed = [("lokr_w1",) if "lokr_w1" in tensors else ("lokr_w1_a", "lokr_w1_b"),
                  ("lokr_w2",) if "lokr_w2" in tensors else ("lokr_w2_a", "lokr_w2_b")]
    else:
        needed = [("lora_down.weight", "lora_up.weight")]
    missing = [key for keys in needed for key in keys if key not in tensors]
    if missing:
        raise UserError(f"{path}: module {name} lacks {missing[0]}; the file is not a complete LoRA")
    provisional = AdapterWeights(tensors=tensors, alpha=1.0)
    # kohya's and LyCORIS' rule: a missing alpha means alpha = rank (scale 1).
    alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(provisional.rank or 1)
    return AdapterWeights(tensors=tensors, alpha=alpha)
