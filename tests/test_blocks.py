"""kohya's 23 SDXL UNet blocks: every module kohya names has the block SDXL's layout puts it in, and diffusers
paths (of SDXL's own architecture and of the tiny test UNet) land in the same blocks.

The per-block counts below follow from SDXL's UNet: input_blocks 4, 5 (level 1) hold Transformer2D models of
depth 2 and 7, 8 (level 2) of depth 10, as do middle_block.1 and output_blocks 0-2, while output_blocks 3-5
have depth 2. With kohya's default targets a Transformer2D model has proj_in, proj_out and 10 linear layers per
transformer block (attn1 and attn2 q/k/v/out, ff in and out): 2 + 10 * 2 = 22 or 2 + 10 * 10 = 102 modules.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from conftest import REPO

from lora_trainer.config import block_weights as blocks
from lora_trainer.config.block_weights import preset_weights
from lora_trainer.model.blocks import sdxl_block_index, unet_block_index
from lora_trainer.adapters.lora import UNET_TARGETS, lora_layers
from lora_trainer.adapters.attach import attach_lora
from lora_trainer.export.kohya_names import kohya_module_name

KOHYA = json.loads((REPO / "tests" / "data" / "kohya_sdxl_lora_names.json").read_text())

# block index -> modules kohya adapts there by default (index = 1 + input block, 10 + middle, 13 + output block)
DEFAULT_MODULES_PER_BLOCK = {5: 22, 6: 22, 8: 102, 9: 102, 11: 102, 13: 102, 14: 102, 15: 102, 16: 22, 17: 22, 18: 22}
# LoCon's extra modules: a resnet's in/out convs and time projection (3), plus its 1x1 skip connection where the
# channels change (input_blocks 4, 7 and every output block, whose input is concatenated); 1 per downsampler
# (input_blocks 3, 6) and upsampler conv (output_blocks 2, 5).
LOCON_MODULES_PER_BLOCK = {
    2: 3, 3: 3, 4: 1, 5: 4, 6: 3, 7: 1, 8: 4, 9: 3,
    10: 3, 12: 3,
    13: 4, 14: 4, 15: 5, 16: 4, 17: 4, 18: 5, 19: 4, 20: 4, 21: 4,
}


def expected_block(diffusers_path: str) -> int:
    """The block of a diffusers UNet module, written out from SDXL's layout (three modules per level and stack)."""
    parts = diffusers_path.split(".")
    top = parts[0]
    if top in ("time_embedding", "add_embedding"):
        return 0
    if top == "conv_in":
        return 1
    if top in ("conv_norm_out", "conv_out"):
        return 22
    if top == "mid_block":
        return 11 if parts[1] == "attentions" else {"0": 10, "1": 12}[parts[2]]
    level, kind = int(parts[1]), parts[2]
    if top == "down_blocks":
        return 4 + 3 * level if kind == "downsamplers" else 2 + 3 * level + int(parts[3])
    if top == "up_blocks":
        return 15 + 3 * level if kind == "upsamplers" else 13 + 3 * level + int(parts[3])
    raise AssertionError(f"unexpected module {diffusers_path}")


@pytest.mark.parametrize("key, expected", [("default", DEFAULT_MODULES_PER_BLOCK), ("locon_extra", LOCON_MODULES_PER_BLOCK)])
def test_every_kohya_unet_module_is_in_its_sdxl_block(key, expected):
    counts = Counter(sdxl_block_index(name) for name in KOHYA[key]["unet"])
    assert dict(counts) == expected
    assert sum(expected.values()) == KOHYA["counts"][key]["unet"]


def test_names_outside_the_stacks_and_bad_names():
    assert sdxl_block_index("lora_unet_time_embed_0") == sdxl_block_index("lora_unet_label_emb_0_2") == 0
    assert sdxl_block_index("lora_unet_input_blocks_0_0") == 1
    assert sdxl_block_index("lora_unet_middle_block_2_out_layers_3") == 12
    assert sdxl_block_index("lora_unet_output_blocks_8_1_proj_out") == 21
    assert sdxl_block_index("lora_unet_out_2") == 22
    for bad in ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_9_0_op", "lora_unet_middle_block_3", "lora_unet_conv_in"):
        with pytest.raises(ValueError):
            sdxl_block_index(bad)


def test_sdxl_diffusers_paths_fall_in_kohyas_blocks():
    """On SDXL's real UNet (meta device, no weights), the adapted diffusers paths give kohya's per-block counts."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.model.sdxl_architecture import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    # The layers PEFT adapts for these targets: those whose path ends with one (attaching takes seconds on SDXL).
    paths = [path for path, _ in unet.named_modules() if any(path.endswith(f".{target}") for target in UNET_TARGETS)]
    assert Counter(unet_block_index(path, unet.config) for path in paths) == Counter(DEFAULT_MODULES_PER_BLOCK)
    assert [unet_block_index(path, unet.config) for path in paths] == [expected_block(path) for path in paths]


def test_every_layer_of_the_tiny_unet_maps_consistently(tiny_model_path):
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.parts import load_sdxl

    unet = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).unet
    layers = [path for path, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    assert {expected_block(path) for path in layers} == set(range(blocks.BLOCK_COUNT))
    for path in layers:
        index = unet_block_index(path, unet.config)
        assert index == expected_block(path), path
        kohya_name = kohya_module_name("unet", path, unet)
        if kohya_name is not None:
            assert sdxl_block_index(kohya_name) == index, path
    attach_lora(unet, UNET_TARGETS, rank=2, alpha=1.0)
    for path, layer in lora_layers(unet).items():
        assert unet_block_index(path, unet.config) == expected_block(path)
        for child, _ in layer.named_modules(prefix=path):  # base_layer, lora_A.default, ...: the same block
            assert unet_block_index(child, unet.config) == expected_block(path)


def test_non_layers_have_no_block():
    config = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    for path in ("down_blocks.0.resnets.0.norm1", "down_blocks.1", "time_proj", "lora_unet_input_blocks_4_1_proj_in"):
        with pytest.raises(ValueError):
            unet_block_index(path, config)


@pytest.mark.parametrize(
    "preset, curve",
    [
        ("sine", lambda t: math.sin(math.pi * t / 2)),
        ("cosine+.25", lambda t: math.cos(math.pi * t / 2) + 0.25),
        ("linear", lambda t: t),
        ("reverse_linear+1", lambda t: 2 - t),
        ("zeros+0.5", lambda t: 0.5),
    ],
)
def test_presets_are_kohyas_curves(preset, curve):
    assert preset_weights(preset, 9) == pytest.approx([curve(k / 8) for k in range(9)], abs=1e-12)


def test_block_weights_come_in_kohyas_order():
    """BASE, 9 input, 3 middle, 9 output, out: the 23 of kohya's `get_block_lr_weight`, padded with 1."""
    from lora_trainer.config.network import NetworkConfig

    network = NetworkConfig(down_lr_weight=[0.1 * k for k in range(9)], mid_lr_weight="2,3,4", up_lr_weight="zeros+1.5")
    weights = network.unet_block_lr_weights
    assert weights == pytest.approx([1.0, *(0.1 * k for k in range(9)), 2.0, 3.0, 4.0, *[1.5] * 9, 1.0])
    assert NetworkConfig(mid_lr_weight=[0, 1, 0]).unet_block_lr_weights == (1.0,) * 10 + (0.0, 1.0, 0.0) + (1.0,) * 10
    assert NetworkConfig().unet_block_lr_weights is None
