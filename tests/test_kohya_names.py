"""On SDXL's real architecture (built on the meta device, no weights), the names we write are kohya's own.

`tests/data/kohya_sdxl_lora_names.json` was produced by running kohya sd-scripts' network builder on
SDXL (tests/data/README.md says how); it lists every module name and the shape of the layer it wraps.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from lora_trainer.adapters.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, lora_layers
from lora_trainer.adapters.attach import attach_lora
from lora_trainer.export.kohya_names import kohya_module_name
from lora_trainer.model.ldm_names import ldm_module_path
from lora_trainer.model.sdxl_architecture import CLIP_BIGG, CLIP_L, SDXL_UNET

KOHYA = json.loads((REPO / "tests" / "data" / "kohya_sdxl_lora_names.json").read_text())


@pytest.fixture(scope="module")
def sdxl_on_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder_1": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
        }


def _adapted_names_and_shapes(part: str, model: torch.nn.Module) -> dict[str, list[int]]:
    targets = UNET_TARGETS if part == "unet" else TEXT_ENCODER_TARGETS
    with torch.device("meta"):
        attach_lora(model, targets, rank=4, alpha=2.0)
    return {
        kohya_module_name(part, path, model): list(layer.get_base_layer().weight.shape)
        for path, layer in lora_layers(model).items()
    }


@pytest.mark.parametrize("part, key", [("unet", "unet"), ("text_encoder_1", "te1"), ("text_encoder_2", "te2")])
def test_default_targets_have_kohyas_names_and_shapes(sdxl_on_meta, part, key):
    ours = _adapted_names_and_shapes(part, sdxl_on_meta[part])
    kohya = KOHYA["default"][key]
    assert len(ours) == KOHYA["counts"]["default"][key]
    assert sorted(ours) == sorted(kohya)
    assert ours == {name: KOHYA["shapes"][name] for name in kohya}


def test_conv_layers_map_to_kohyas_locon_names(sdxl_on_meta):
    """The resnet, downsampler and upsampler convs (LoCon's extra targets) map to kohya's names too."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    conv_children = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
    ours = {}
    for path, module in unet.named_modules():
        in_resnet = ".resnets." in path and path.rsplit(".", 1)[-1] in conv_children
        in_sampler = path.endswith(("downsamplers.0.conv", "upsamplers.0.conv"))
        if in_resnet or in_sampler:
            ours["lora_unet_" + ldm_module_path(path, unet.config).replace(".", "_")] = list(module.weight.shape)
    kohya = KOHYA["locon_extra"]["unet"]
    assert sorted(ours) == sorted(kohya)
    assert ours == {name: KOHYA["shapes"][name] for name in kohya}


def test_text_encoder_names_keep_text_model_level_on_both_encoders(sdxl_on_meta):
    # transformers 5: CLIPTextModel has no `text_model` level, CLIPTextModelWithProjection still has one.
    te1_paths = [name for name, _ in sdxl_on_meta["text_encoder_1"].named_modules() if name.endswith("layers.0.mlp.fc1")]
    te2_paths = [name for name, _ in sdxl_on_meta["text_encoder_2"].named_modules() if name.endswith("layers.0.mlp.fc1")]
    assert [kohya_module_name("text_encoder_1", path, None) for path in te1_paths] == [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    ]
    assert [kohya_module_name("text_encoder_2", path, None) for path in te2_paths] == [
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    ]
