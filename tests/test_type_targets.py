"""On SDXL's real architecture (built on the meta device, no weights): each type adapts kohya's modules at kohya's
ranks, per-block ranks reach exactly the modules of each block through PEFT, and the settings that do not fit a
type are one-line config errors.

kohya's names and the shapes of the layers they wrap come from `tests/data/kohya_sdxl_lora_names.json` (kohya
sd-scripts' own network builder run on SDXL); its rule (networks/lora.py): with LoCon's `conv_dim`, only the 3x3
convolutions take `conv_dim`, the time-embedding Linears and 1x1 shortcuts keep `network_dim`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import REPO, run_cli, small_raw_config, write_yaml

from lora_trainer.adapters.attach import attach_network
from lora_trainer.adapters.lora import ADAPTER_NAME, lora_layers
from lora_trainer.adapters.targets import adapter_targets
from lora_trainer.config.network import NetworkConfig
from lora_trainer.export.kohya_names import kohya_module_name
from lora_trainer.model.sdxl_architecture import CLIP_BIGG, CLIP_L, SDXL_UNET

KOHYA = json.loads((REPO / "tests" / "data" / "kohya_sdxl_lora_names.json").read_text())
KOHYA_UNET_LOCON = set(KOHYA["default"]["unet"]) | set(KOHYA["locon_extra"]["unet"])

# One value per kohya SDXL block (BASE, input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out): distinct
# wherever a block has such modules, 0 for some attention and convolution blocks.
BLOCK_DIMS = [1, 2, 3, 4, 5, 6, 7, 8, 0, 10, 11, 0, 13, 14, 0, 16, 17, 18, 19, 20, 21, 22, 23]
CONV_BLOCK_DIMS = [31, 32, 33, 34, 0, 36, 37, 38, 39, 40, 41, 42, 0, 44, 45, 46, 47, 48, 49, 0, 51, 52, 53]
STACK_OFFSETS = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def kohya_block(name: str) -> int:
    """kohya's block index of a UNet module, read from its kohya name: input_blocks N is 1+N, middle_block N
    10+N, output_blocks N 13+N."""
    match = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
    assert match, name
    return STACK_OFFSETS[match.group(1)] + int(match.group(2))


def is_3x3(name: str) -> bool:
    return KOHYA["shapes"][name][2:] == [3, 3]


def meta_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


@pytest.fixture(scope="module")
def sdxl_on_meta():
    """SDXL's three parts without adapters (planning targets only reads them)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": meta_unet(),
            "text_encoder_1": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
        }


PER_BLOCK = NetworkConfig(type="dora", rank=8, alpha=4, conv_rank=4, block_dims=BLOCK_DIMS, conv_block_dims=CONV_BLOCK_DIMS)


@pytest.fixture(scope="module")
def per_block_unet():
    """A UNet with PER_BLOCK's DoRA attached through PEFT on the meta device, and the targets it was given."""
    unet = meta_unet()
    targets = adapter_targets("unet", unet, PER_BLOCK)
    with torch.device("meta"):
        attach_network(unet, targets, PER_BLOCK)
    return unet, targets


def _kohya_ranks(part: str, model: torch.nn.Module, network: NetworkConfig) -> dict[str, int]:
    return {kohya_module_name(part, path, model): setting.rank for path, setting in adapter_targets(part, model, network).items()}


def test_locon_adapts_kohyas_modules_at_kohyas_ranks(sdxl_on_meta):
    network = NetworkConfig(type="locon", rank=8, alpha=6, conv_rank=4, conv_alpha=2)
    targets = adapter_targets("unet", sdxl_on_meta["unet"], network)
    by_name = {kohya_module_name("unet", path, sdxl_on_meta["unet"]): setting for path, setting in targets.items()}
    assert len(KOHYA["locon_extra"]["unet"]) == 66
    assert set(by_name) == KOHYA_UNET_LOCON
    assert {name: (setting.rank, setting.alpha) for name, setting in by_name.items()} == {
        name: (4, 2.0) if is_3x3(name) else (8, 6.0) for name in KOHYA_UNET_LOCON
    }
    # the two kinds kohya keeps at the network rank are really among them
    assert by_name["lora_unet_input_blocks_1_0_emb_layers_1"].rank == 8 and len(KOHYA["shapes"]["lora_unet_input_blocks_1_0_emb_layers_1"]) == 2
    assert by_name["lora_unet_input_blocks_4_0_skip_connection"].rank == 8
    assert KOHYA["shapes"]["lora_unet_input_blocks_4_0_skip_connection"][2:] == [1, 1]


@pytest.mark.parametrize("part, key, count", [("text_encoder_1", "te1", 72), ("text_encoder_2", "te2", 192)])
def test_locon_leaves_the_text_encoders_as_plain_lora(sdxl_on_meta, part, key, count):
    ranks = _kohya_ranks(part, sdxl_on_meta[part], NetworkConfig(type="locon", rank=8, conv_rank=4))
    assert len(ranks) == count
    assert ranks == {name: 8 for name in KOHYA["default"][key]}


def test_per_block_ranks_follow_each_modules_block(sdxl_on_meta):
    ranks = _kohya_ranks("unet", sdxl_on_meta["unet"], PER_BLOCK)
    expected = {}
    for name in KOHYA_UNET_LOCON:
        rank = (CONV_BLOCK_DIMS if is_3x3(name) else BLOCK_DIMS)[kohya_block(name)]
        if rank:
            expected[name] = rank
    assert ranks == expected
    # a block at 0 in one list keeps the modules the other list sizes
    assert {name for name in ranks if kohya_block(name) == 8} == {  # input_blocks 7: linear rank 0, its convolutions kept
        "lora_unet_input_blocks_7_0_in_layers_2", "lora_unet_input_blocks_7_0_out_layers_3"
    }
    assert {name for name in ranks if kohya_block(name) == 12} == {"lora_unet_middle_block_2_emb_layers_1"}  # conv rank 0


def test_peft_gives_every_module_its_planned_rank(per_block_unet):
    unet, targets = per_block_unet
    layers = lora_layers(unet, ADAPTER_NAME)
    assert set(layers) == set(targets)
    assert len(set(setting.rank for setting in targets.values())) > 20  # PEFT's rank_pattern carries most of them
    for path, layer in layers.items():
        name = kohya_module_name("unet", path, unet)
        rank = (CONV_BLOCK_DIMS if is_3x3(name) else BLOCK_DIMS)[kohya_block(name)]
        assert layer.r[ADAPTER_NAME] == targets[path].rank == rank, name


def test_dora_attaches_on_the_meta_device_with_a_magnitude_per_output(per_block_unet):
    unet, _ = per_block_unet
    for path, layer in lora_layers(unet, ADAPTER_NAME).items():
        base = layer.get_base_layer().weight
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight
        assert magnitude.numel() == base.shape[0], path


ZEROS = [0] * 23
# The field's name is already the error's location, and `_check_block_ranks` names it again.
TYPE_ERRORS = [
    ({"type": "lora", "conv_rank": 4}, "network.conv_rank: plain LoRA adapts no convolutions; set network.type: locon"),
    ({"type": "dora", "conv_alpha": 2}, "network.conv_alpha: no convolution is adapted; set network.conv_rank (or network.type: locon)"),
    ({"type": "loha", "conv_block_dims": [2] * 23}, "network.conv_block_dims: no convolution is adapted; set network.conv_rank"),
    ({"type": "lora", "conv_block_alphas": [2] * 23}, "network.conv_block_alphas: no convolution is adapted;"),
    ({"type": "locon", "lokr_factor": 4}, "network.lokr_factor: a LoKr setting, but network.type is locon; set network.type: lokr or drop it"),
    ({"type": "loha", "lokr_decompose_both": True}, "network.lokr_decompose_both: a LoKr setting, but network.type is loha;"),
    ({"type": "dora", "lokr_full_matrix": True}, "network.lokr_full_matrix: a LoKr setting, but network.type is dora;"),
    ({"type": "lora", "dylora_unit": 2}, "network.dylora_unit: a DyLoRA setting, but network.type is lora; set network.type: dylora"),
    ({"type": "lokr", "lokr_factor": 1}, "network.lokr_factor: 1 splits nothing; give -1 (as even as possible) or a factor of 2 or more"),
    ({"type": "dylora", "rank": 6, "dylora_unit": 4}, "network.dylora_unit: every rank must be a multiple of the unit 4, 6 is not;"),
    ({"type": "dylora", "rank": 8, "dylora_unit": 4, "block_dims": [8] * 22 + [6]}, "network.dylora_unit: every rank must be a multiple"),
    ({"type": "loha", "dropout": 0.1}, "network.dropout: loha has no input dropout (LyCORIS neither); use network.rank_dropout"),
    ({"type": "lokr", "dropout": 0.1}, "network.dropout: lokr has no input dropout"),
    ({"type": "loha", "loraplus_lr_ratio": 16}, "network.loraplus_lr_ratio: LoRA+ speeds up LoRA's up matrices, which loha has not;"),
    ({"type": "lokr", "loraplus_unet_lr_ratio": 16}, "network.loraplus_unet_lr_ratio: LoRA+ speeds up LoRA's up matrices"),
    ({"type": "loha", "scale_weight_norms": 1.0}, "network.scale_weight_norms: kohya's max-norm is defined on LoRA's up @ down; drop it"),
    pytest.param({"block_dims": [4] * 22}, "network.block_dims: needs 23 values, one per SDXL UNet block as kohya counts them"),
    pytest.param({"block_dims": [4] * 22 + [-1]}, "network.block_dims: every value must be 0 or more (0: no adapter)"),
    pytest.param({"block_alphas": [4.0] * 22 + [0]}, "network.block_alphas: every value must be above 0"),
    ({"block_dims": [4] * 23, "train_unet": False}, "network.block_dims: per-block ranks act on the UNet, which does not train;"),
    ({"block_dims": ZEROS}, "network.block_dims: every UNet block has rank 0, so the UNet trains nothing; set network.train_unet: false"),
    ({"type": "locon", "block_dims": ZEROS, "conv_block_dims": ZEROS}, "network.block_dims: every UNet block has rank 0"),
]


def _settings_id(case: tuple | object) -> str:
    settings = case.values[0] if hasattr(case, "values") else case[0]
    return ",".join(f"{key}={f'[{len(item)}]' if isinstance(item, list) else item}" for key, item in settings.items())


@pytest.mark.parametrize("settings, expected", TYPE_ERRORS, ids=[_settings_id(case) for case in TYPE_ERRORS])
def test_a_setting_that_does_not_fit_the_type_is_a_one_line_error(settings, expected, tmp_path, capsys):
    raw = small_raw_config(tmp_path)
    raw["network"].update(settings)
    path = write_yaml(tmp_path / "bad.yaml", raw)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    assert expected in lines[0], err


def test_zero_linear_ranks_are_valid_while_the_convolutions_train(sdxl_on_meta):
    ranks = _kohya_ranks("unet", sdxl_on_meta["unet"], NetworkConfig(type="locon", rank=8, conv_rank=4, block_dims=ZEROS))
    assert ranks == {name: 4 for name in KOHYA_UNET_LOCON if is_3x3(name)}
