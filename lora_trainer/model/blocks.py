"""SDXL's UNet as kohya sd-scripts counts its blocks: 23 indices, the unit of per-block learning rates and ranks.

kohya (sd-scripts `networks/lora.py`, `get_block_index` with `is_sdxl`; the same count as `sdxl_train.py`'s
`--block_lr`) numbers the original ("LDM") SDXL layout, which is also how it names LoRA modules:

    0        BASE: time_embed, label_emb (the time and size/crop embeddings)
    1..9     input_blocks.0..8 (input_blocks.0 is conv_in; 1-2, 4-5, 7-8 are the down levels' resnet and
             attention pairs; 3 and 6 downsample)
    10..12   middle_block.0 (resnet), .1 (attention), .2 (resnet)
    13..21   output_blocks.0..8 (three per up level; 2 and 5 also upsample)
    22       out: the final norm and conv_out

In diffusers terms (`model.ldm_names` does the mapping): down_blocks.i.{resnets,attentions}.j is block
2 + 3i + j, down_blocks.i.downsamplers is 4 + 3i, mid_block.resnets.0 / attentions.0 / resnets.1 are
10 / 11 / 12, up_blocks.i.{resnets,attentions}.j and up_blocks.i.upsamplers are 13 + 3i + j (j = 2 for
the upsampler).

kohya's SDXL LoRA does support block learning rates: for an SDXL UNet `down_lr_weight` and `up_lr_weight`
take 9 values each (input blocks 0..8, output blocks 0..8, shallow to deep and deep to shallow) and
`mid_lr_weight` 3; `get_block_lr_weight` pads them to 23 with weight 1 for BASE and out, the same 23 as
`block_dims`. kohya never adapts BASE, input_blocks.0 or out, so their weights do nothing there.
`down_lr_weight` / `up_lr_weight` may instead name a curve over the 9 blocks (`config.block_weights`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lora_trainer.config.block_weights import (
    BASE_BLOCK,
    FIRST_INPUT_BLOCK,
    FIRST_MIDDLE_BLOCK,
    FIRST_OUTPUT_BLOCK,
    INPUT_BLOCKS,
    MIDDLE_BLOCKS,
    OUT_BLOCK,
    OUTPUT_BLOCKS,
)
from lora_trainer.model.ldm_names import ldm_module_path

UNET_PREFIX = "lora_unet_"
_STACKS = {
    "input_blocks": (FIRST_INPUT_BLOCK, INPUT_BLOCKS),
    "middle_block": (FIRST_MIDDLE_BLOCK, MIDDLE_BLOCKS),
    "output_blocks": (FIRST_OUTPUT_BLOCK, OUTPUT_BLOCKS),
}
_STACK_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks)_(\d+)(?:_|$)")
_BASE_NAME = re.compile(r"^(?:time_embed|label_emb)(?:_|$)")
_OUT_NAME = re.compile(r"^out(?:_|$)")

# diffusers modules outside the three stacks, and the LDM module each one is.
_OUTSIDE_STACKS = {
    "time_embedding": "time_embed",
    "add_embedding": "label_emb",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sdxl_block_index(kohya_module_name: str) -> int:
    """The block (0..22) of a kohya SDXL UNet module name such as `lora_unet_input_blocks_4_1_proj_in`.

    As kohya's `get_block_index` for SDXL, except that a name outside the UNet is an error, not -1.
    """
    if not kohya_module_name.startswith(UNET_PREFIX):
        raise ValueError(f"{kohya_module_name!r} is not a kohya SDXL UNet module name (they start with {UNET_PREFIX!r})")
    name = kohya_module_name[len(UNET_PREFIX) :]
    stack = _STACK_NAME.match(name)
    if stack:
        first, count = _STACKS[stack.group(1)]
        number = int(stack.group(2))
        if number >= count:
            raise ValueError(f"{kohya_module_name!r}: SDXL has {stack.group(1)} 0..{count - 1}, not {number}")
        return first + number
    if _BASE_NAME.match(name):
        return BASE_BLOCK
    if _OUT_NAME.match(name):
        return OUT_BLOCK
    raise ValueError(f"{kohya_module_name!r} is in none of SDXL's UNet blocks")


def unet_block_index(module_path: str, unet_config: Mapping[str, Any]) -> int:
    """The block (0..22) of a diffusers UNet module path as the (PEFT-wrapped) model names it, such as
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`: through its kohya name, as kohya counts.

    Every linear and conv layer has one; resnet norms and bare containers such as `down_blocks.1` do not.
    """
    ldm_path = ldm_module_path(module_path, unet_config)
    if ldm_path is None:
        first, _, rest = module_path.partition(".")
        ldm_path = _OUTSIDE_STACKS.get(first)
        if ldm_path is not None and rest:
            ldm_path = f"{ldm_path}.{rest}"
    if ldm_path is None:
        raise ValueError(f"{module_path!r} is no layer of an SDXL UNet block")
    return sdxl_block_index(UNET_PREFIX + ldm_path.replace(".", "_"))
