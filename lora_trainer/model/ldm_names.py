"""diffusers UNet module paths -> the original SDXL ("LDM"/sgm) paths that kohya-format LoRA files use.

diffusers' `UNet2DConditionModel` nests `down_blocks / mid_block / up_blocks`; the original model,
and with it ComfyUI, A1111 and Forge, counts `input_blocks / middle_block / output_blocks`. With `n`
resnets per down level (SDXL: 2) there are `n + 1` input blocks per level (the last one downsamples)
and `n + 1` resnets, hence output blocks, per up level:

    down_blocks.i.{resnets|attentions}.j   -> input_blocks.{i(n+1)+j+1}.{0|1}
    down_blocks.i.downsamplers.0.conv      -> input_blocks.{(i+1)(n+1)}.0.op
    mid_block.resnets.{0,1}                -> middle_block.{0,2}
    mid_block.attentions.0                 -> middle_block.1
    up_blocks.i.{resnets|attentions}.j     -> output_blocks.{i(n+1)+j}.{0|1}
    up_blocks.i.upsamplers.0.conv          -> output_blocks.{i(n+1)+n}.{2 if the level has attention else 1}.conv

Resnet children are renamed; attention children keep their diffusers names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RESNET_CHILDREN = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def ldm_module_path(path: str, unet_config: Mapping[str, Any]) -> str | None:
    """The original-SDXL path of a diffusers UNet module, or None for modules outside the three stacks."""
    parts = path.split(".")
    per_level = _layers_per_block(unet_config) + 1
    try:
        if parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                return _join(f"input_blocks.{(level + 1) * per_level}.0", _downsampler_child(parts[4:]))
            index = int(parts[3])
            return _join(f"input_blocks.{level * per_level + index + 1}.{_slot(kind)}", _child(kind, parts[4:]))
        if parts[0] == "mid_block":
            kind, index = parts[1], int(parts[2])
            block = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * index}"
            return _join(block, _child(kind, parts[3:]))
        if parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                has_attention = "CrossAttn" in unet_config["up_block_types"][level]
                return _join(f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}", parts[4:])
            index = int(parts[3])
            return _join(f"output_blocks.{level * per_level + index}.{_slot(kind)}", _child(kind, parts[4:]))
    except (IndexError, ValueError, KeyError):
        return None
    return None


def _layers_per_block(unet_config: Mapping[str, Any]) -> int:
    layers = unet_config["layers_per_block"]
    if isinstance(layers, int):
        return layers
    if len(set(layers)) != 1:
        raise ValueError(f"a UNet with different layers_per_block per level ({layers}) has no SDXL block layout")
    return layers[0]


def _slot(kind: str) -> int:
    if kind == "resnets":
        return 0
    if kind == "attentions":
        return 1
    raise ValueError(kind)


def _child(kind: str, rest: list[str]) -> list[str] | None:
    if kind != "resnets":
        return rest
    if not rest or rest[0] not in RESNET_CHILDREN:
        return None
    return [RESNET_CHILDREN[rest[0]], *rest[1:]]


def _downsampler_child(rest: list[str]) -> list[str] | None:
    return ["op", *rest[1:]] if rest and rest[0] == "conv" else None


def _join(block: str, rest: list[str] | None) -> str | None:
    if rest is None:
        return None
    return ".".join([block, *rest]) if rest else block
