"""kohya's SDXL module names, the names every UI maps: a part prefix plus the module path with dots turned
into underscores.

- UNet, `lora_unet_`: the original SDXL block layout (`input_blocks_4_1_...`), see `ldm_names`;
- CLIP-L, `lora_te1_` and CLIP-bigG, `lora_te2_`: always `text_model_encoder_layers_...`. transformers 5
  dropped the `text_model` level from `CLIPTextModel` but kept it in `CLIPTextModelWithProjection`;
  both are written with it, because ComfyUI, A1111 and Forge only map names that contain it.
"""

from __future__ import annotations

import torch

from lora_trainer.model.ldm_names import ldm_module_path

PART_PREFIXES = {"unet": "lora_unet_", "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_module_name(part: str, module_path: str, model: torch.nn.Module) -> str | None:
    """The kohya name of a module of `model` (the UNet or a text encoder), or None if it has none."""
    if part == "unet":
        ldm_path = ldm_module_path(module_path, model.config)
        return None if ldm_path is None else PART_PREFIXES[part] + ldm_path.replace(".", "_")
    if part in ("text_encoder_1", "text_encoder_2"):
        path = module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"
        return PART_PREFIXES[part] + path.replace(".", "_")
    raise ValueError(f"unknown model part {part!r}")


def kohya_names(part: str, model: torch.nn.Module) -> dict[str, str]:
    """kohya name -> module path, for every linear and conv layer of `model`."""
    names = {}
    for module_path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            name = kohya_module_name(part, module_path, model)
            if name is not None:
                names[name] = module_path
    return names
