"""Per-part learning rates, per-block UNet weights and LoRA+ as optimizer groups on the tiny SDXL, the metadata
kohya writes for them, and max-norm regularisation against a computation by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import small_raw_config
from test_blocks import expected_block

from lora_trainer.adapters.lora import lora_layers
from lora_trainer.adapters.attach import attach_lora
from lora_trainer.adapters.wiring import attach_adapters, trainable_parameters
from lora_trainer.config.load import parse_config
from lora_trainer.config.network import NetworkConfig
from lora_trainer.fit.max_norm import apply_max_norm
from lora_trainer.export.metadata import kohya_learning_rate_metadata, kohya_network_args
from lora_trainer.fit.param_groups import freeze_unweighted_blocks, parameter_groups

UNET_RATE, TE1_RATE, TE2_RATE = 1e-3, 2e-4, 3e-4
# input_blocks 0..8 -> blocks 1..9; with default targets the adapters sit in blocks 5, 6, 8, 9, 11 and 13-18.
DOWN = [1, 1, 1, 1, 0, 0.5, 1, 1, 2]  # block 5 frozen, block 6 at 0.5, block 8 at the UNet's rate, block 9 at 2
MID = [1, 0.5, 1]  # block 11 at 0.5
# up "linear": output block k at k / 8, so block 13 (k = 0) is frozen and block 17 (k = 4) is at 0.5
UNET_LORAPLUS, TEXT_LORAPLUS = 4.0, 2.0


def config_of(tmp_path, **network):
    raw = small_raw_config(tmp_path)
    raw["training"]["learning_rate"] = UNET_RATE
    raw["network"].update(network)
    return parse_config(raw)


def weighted_config(tmp_path):
    return config_of(
        tmp_path,
        text_encoder_1_learning_rate=TE1_RATE,
        text_encoder_2_learning_rate=TE2_RATE,
        down_lr_weight=DOWN,
        mid_lr_weight=MID,
        up_lr_weight="linear",
        loraplus_unet_lr_ratio=UNET_LORAPLUS,
        loraplus_lr_ratio=TEXT_LORAPLUS,
    )


def block_weight(block: int) -> float:
    """The factor of block `block` under DOWN, MID and up "linear", by kohya's layout: 1 + 9 + 3 + 9 + 1."""
    if 1 <= block <= 9:
        return DOWN[block - 1]
    if 10 <= block <= 12:
        return MID[block - 10]
    if 13 <= block <= 21:
        return (block - 13) / 8
    return 1.0


def expected_rate(part: str, module_path: str, parameter_name: str) -> float:
    up = ".lora_B." in f".{parameter_name}"
    if part == "unet":
        return UNET_RATE * block_weight(expected_block(module_path)) * (UNET_LORAPLUS if up else 1)
    return (TE1_RATE if part == "text_encoder_1" else TE2_RATE) * (TEXT_LORAPLUS if up else 1)


@pytest.fixture(scope="module")
def loaded_parts(tiny_model_path):
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.parts import load_sdxl

    return load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).lora_targets()


@pytest.fixture
def tiny_parts(loaded_parts):
    """The tiny SDXL's UNet and text encoders, a fresh copy for each test to attach adapters to."""
    return copy.deepcopy(loaded_parts)


def test_weighted_groups_give_every_trainable_parameter_its_rate(tiny_parts, tmp_path):
    config = weighted_config(tmp_path)
    trained = attach_adapters(tiny_parts, config.network)
    unweighted = [path for path in lora_layers(trained["unet"]) if block_weight(expected_block(path)) == 0]
    assert freeze_unweighted_blocks(trained, config.network) == len(unweighted) > 0

    groups = parameter_groups(trained, config)
    group_of = {id(parameter): group for group in groups for parameter in group["params"]}
    assert sum(len(group["params"]) for group in groups) == len(group_of), "a parameter is in two groups"
    trainable = {id(parameter) for model in trained.values() for parameter in trainable_parameters(model)}
    assert set(group_of) == trainable
    assert all(group["params"] for group in groups)

    expected_groups = set()
    for part, model in trained.items():
        for path, layer in lora_layers(model).items():
            for name, parameter in layer.named_parameters():
                if not parameter.requires_grad:
                    assert id(parameter) not in group_of
                    continue
                assert group_of[id(parameter)]["lr"] == pytest.approx(expected_rate(part, path, name), rel=1e-12), (part, path, name)
                weight = block_weight(expected_block(path)) if part == "unet" else 1
                expected_groups.add((part, weight, ".lora_B." in f".{name}"))
    assert len(groups) == len(expected_groups)  # one group per part, block weight and matrix (down or LoRA+'s up)
    for path in unweighted:
        assert not any(parameter.requires_grad for parameter in lora_layers(trained["unet"])[path].parameters())

    names = {group["name"]: group["lr"] for group in groups}
    assert names["unet"] == UNET_RATE and names["unet/lora_up"] == UNET_RATE * UNET_LORAPLUS
    assert names["unet/block6+11+17"] == pytest.approx(UNET_RATE * 0.5)
    assert names["unet/block9/lora_up"] == pytest.approx(UNET_RATE * 2 * UNET_LORAPLUS)
    assert names["text_encoder_1"] == TE1_RATE and names["text_encoder_1/lora_up"] == TE1_RATE * TEXT_LORAPLUS
    assert names["text_encoder_2"] == TE2_RATE and names["text_encoder_2/lora_up"] == TE2_RATE * TEXT_LORAPLUS


def test_plain_config_has_one_group_per_part(tiny_parts, tmp_path):
    config = config_of(tmp_path, text_encoder_learning_rate=5e-5, train_text_encoder_2=False)
    trained = attach_adapters(tiny_parts, config.network)
    assert freeze_unweighted_blocks(trained, config.network) == 0
    groups = parameter_groups(trained, config)
    assert [(group["name"], group["lr"]) for group in groups] == [("unet", UNET_RATE), ("text_encoder_1", 5e-5)]
    for group, part in zip(groups, ("unet", "text_encoder_1")):
        assert {id(parameter) for parameter in group["params"]} == {id(parameter) for parameter in trainable_parameters(trained[part])}


def test_block_weights_need_a_training_unet_that_trains_somewhere():
    with pytest.raises(ValueError, match="up_lr_weight: block weights act on the UNet, which does not train"):
        NetworkConfig(train_unet=False, up_lr_weight="sine")
    with pytest.raises(ValueError, match="down_lr_weight: every UNet block has weight 0"):
        NetworkConfig(down_lr_weight="zeros", mid_lr_weight=[0, 0, 0], up_lr_weight=[0] * 9)
    NetworkConfig(down_lr_weight="zeros", up_lr_weight="zeros")  # the middle blocks still train


def test_kohya_metadata_of_the_settings(tmp_path):
    config = weighted_config(tmp_path)
    assert kohya_network_args(config.network) == {
        "down_lr_weight": "1.0,1.0,1.0,1.0,0.0,0.5,1.0,1.0,2.0",
        "mid_lr_weight": "1.0,0.5,1.0",
        "up_lr_weight": "linear",
        "loraplus_lr_ratio": "2.0",
        "loraplus_unet_lr_ratio": "4.0",
    }
    assert kohya_learning_rate_metadata(config) == {"ss_text_encoder_lr": "[0.0002, 0.0003]"}
    plain = config_of(tmp_path, text_encoder_learning_rate=5e-5)
    assert kohya_network_args(plain.network) == {}
    assert kohya_learning_rate_metadata(plain) == {"ss_text_encoder_lr": "5e-05"}
    unet_only = config_of(tmp_path, train_text_encoder_1=False, train_text_encoder_2=False)
    assert kohya_learning_rate_metadata(unet_only) == {"ss_text_encoder_lr": ""}


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.frozen = torch.nn.Linear(4, 4)


def test_max_norm_scales_down_and_up_by_the_root_of_the_ratio():
    torch.manual_seed(0)
    model = TwoLayers()
    rank, alpha, max_norm = 2, 3.0, 1.0
    attach_lora(model, ["linear", "conv", "frozen"], rank=rank, alpha=alpha)
    layers = lora_layers(model)
    big = {"linear": (torch.randn(2, 6), torch.randn(5, 2)), "conv": (0.1 * torch.randn(2, 3, 3, 3), 0.1 * torch.randn(4, 2, 1, 1))}
    big["frozen"] = (torch.randn(2, 4), torch.randn(4, 2))
    with torch.no_grad():
        for name, (down, up) in big.items():
            layers[name].lora_A["default"].weight.copy_(down)
            layers[name].lora_B["default"].weight.copy_(up)
    for parameter in layers["frozen"].parameters():
        parameter.requires_grad_(False)

    scale = alpha / rank
    norms = {
        "linear": (scale * big["linear"][1] @ big["linear"][0]).norm().item(),
        # a conv LoRA's update is the conv kernel of down followed by the 1x1 up (kohya's own formula)
        "conv": (scale * torch.nn.functional.conv2d(big["conv"][0].permute(1, 0, 2, 3), big["conv"][1]).permute(1, 0, 2, 3)).norm().item(),
    }
    assert norms["linear"] > max_norm > norms["conv"] > 0, "the test needs one adapter over the bound and one under"

    keys_scaled, mean_norm, largest = apply_max_norm({"model": model}, max_norm)

    assert keys_scaled == 1
    assert mean_norm == pytest.approx((max_norm + norms["conv"]) / 2, rel=1e-5)
    assert largest == pytest.approx(max_norm, rel=1e-5)
    factor = math.sqrt(max_norm / norms["linear"])
    assert torch.allclose(layers["linear"].lora_A["default"].weight, big["linear"][0] * factor, rtol=1e-5)
    assert torch.allclose(layers["linear"].lora_B["default"].weight, big["linear"][1] * factor, rtol=1e-5)
    for name in ("conv", "frozen"):  # under the bound, and not training: both untouched
        assert torch.equal(layers[name].lora_A["default"].weight, big[name][0])
        assert torch.equal(layers[name].lora_B["default"].weight, big[name][1])
