"""tests/ldm_checkpoint.py writes the layout that model sites ship: diffusers' own single-file loaders read it back.

The independent check is diffusers' `from_single_file` / `create_diffusers_clip_model_from_ldm`, offline, with
the tiny folder as `config`: every loaded tensor must equal the folder's exactly, none left on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ldm_checkpoint import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, write_ldm_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

EXTRA = {"v_pred": torch.tensor([]), OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(4.6052)}
METADATA = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "made_by": {"test": 1}}


@pytest.fixture(scope="module")
def ldm_file(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ldm") / "tiny_sdxl_ldm.safetensors"
    return write_ldm_checkpoint(tiny_model_path, out, extra_tensors=EXTRA, metadata=METADATA)


@pytest.fixture(scope="module")
def checkpoint(ldm_file: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ldm_file))


def _folder_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / component / name))


def _assert_same(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    assert not on_meta, f"left on the meta device: {on_meta[:5]}"
    loaded = model.state_dict()
    assert set(loaded) == set(original), (
        sorted(set(original) - set(loaded))[:5],
        sorted(set(loaded) - set(original))[:5],
    )
    different = [key for key, value in original.items() if not torch.equal(loaded[key], value)]
    assert not different, different[:5]


def _has_meta(model: torch.nn.Module) -> bool:
    return any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])


def test_layout_is_stability_sgm(tiny_model_path: Path, ldm_file: Path, checkpoint: dict[str, torch.Tensor]) -> None:
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)
    assert all(key.startswith(prefixes) or key in EXTRA for key in checkpoint)

    # Every tensor of the folder is written once: counts per part, the OpenCLIP q, k, v (x weight, bias) fused.
    layers_2 = json.loads((tiny_model_path / "text_encoder_2" / "config.json").read_text())["num_hidden_layers"]
    expected = {
        UNET_PREFIX: len(_folder_weights(tiny_model_path, "unet")),
        VAE_PREFIX: len(_folder_weights(tiny_model_path, "vae")),
        CLIP_L_PREFIX: len(_folder_weights(tiny_model_path, "text_encoder")),
        OPEN_CLIP_PREFIX: len(_folder_weights(tiny_model_path, "text_encoder_2")) - 4 * layers_2 + 1,  # + logit_scale
    }
    assert {prefix: sum(key.startswith(prefix) for key in checkpoint) for prefix in prefixes} == expected

    # SDXL's indices: downsamplers as their own input blocks, the upsampler after the transformer or the resnet.
    unet = _folder_weights(tiny_model_path, "unet")
    for ldm, diffusers in [
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
        ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        ("input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
        ("input_blocks.6.0.op.weight", "down_blocks.1.downsamplers.0.conv.weight"),
        (
            "middle_block.1.transformer_blocks.1.attn2.to_k.weight",
            "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight",
        ),
        ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
        ("output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
        ("output_blocks.8.0.out_layers.3.weight", "up_blocks.2.resnets.2.conv2.weight"),
        ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
        ("time_embed.0.weight", "time_embedding.linear_1.weight"),
        ("out.2.weight", "conv_out.weight"),
    ]:
        assert torch.equal(checkpoint[UNET_PREFIX + ldm], unet[diffusers]), ldm

    # VAE: the decoder's levels reversed, the mid attention as 1x1 convolutions.
    vae = _folder_weights(tiny_model_path, "vae")
    levels = len(json.loads((tiny_model_path / "vae" / "config.json").read_text())["up_block_types"])
    assert torch.equal(
        checkpoint[VAE_PREFIX + f"decoder.up.{levels - 1}.block.0.conv1.weight"],
        vae["decoder.up_blocks.0.resnets.0.conv1.weight"],
    )
    q = vae["encoder.mid_block.attentions.0.to_q.weight"]
    assert checkpoint[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (*q.shape, 1, 1)
    assert torch.equal(
        checkpoint[VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
        vae["decoder.mid_block.attentions.0.to_out.0.weight"],
    )

    # CLIP-L under text_model.; OpenCLIP with q, k, v fused and the projection transposed.
    clip_l = _folder_weights(tiny_model_path, "text_encoder")
    assert all(key.startswith(CLIP_L_PREFIX + "text_model.") for key in checkpoint if key.startswith(CLIP_L_PREFIX))
    assert any(key.removeprefix("text_model.") == "final_layer_norm.weight" for key in clip_l)
    open_clip = _folder_weights(tiny_model_path, "text_encoder_2")
    fused = torch.cat([open_clip[f"text_model.encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(checkpoint[OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"], fused)
    assert torch.equal(checkpoint[OPEN_CLIP_PREFIX + "text_projection"], open_clip["text_projection.weight"].T)
    assert torch.equal(
        checkpoint[OPEN_CLIP_PREFIX + "positional_embedding"],
        open_clip["text_model.embeddings.position_embedding.weight"],
    )

    assert checkpoint["v_pred"].numel() == 0
    with safe_open(str(ldm_file), framework="pt") as handle:
        header = handle.metadata()
    assert header["modelspec.architecture"] == METADATA["modelspec.architecture"]
    assert json.loads(header["made_by"]) == METADATA["made_by"]


def test_diffusers_single_file_loaders_read_it_back_exactly(
    tiny_model_path: Path, ldm_file: Path, checkpoint: dict[str, torch.Tensor]
) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = str(tiny_model_path)
    unet = UNet2DConditionModel.from_single_file(str(ldm_file), config=folder, subfolder="unet", local_files_only=True)
    _assert_same(unet, _folder_weights(tiny_model_path, "unet"))
    vae = AutoencoderKL.from_single_file(str(ldm_file), config=folder, subfolder="vae", local_files_only=True)
    _assert_same(vae, _folder_weights(tiny_model_path, "vae"))
    for cls, subfolder in [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")]:
        model = create_diffusers_clip_model_from_ldm(
            cls, checkpoint, subfolder=subfolder, config=folder, local_files_only=True
        )
        _assert_same(model, _folder_weights(tiny_model_path, subfolder))


def test_options_leave_out_parts_and_cast(tiny_model_path: Path, tmp_path: Path) -> None:
    out = write_ldm_checkpoint(
        tiny_model_path,
        tmp_path / "unet_only.safetensors",
        include_vae=False,
        include_text_encoders=False,
        dtype=torch.float16,
    )
    written = load_file(str(out))
    assert written and all(key.startswith(UNET_PREFIX) for key in written)
    assert len(written) == len(_folder_weights(tiny_model_path, "unet"))
    assert {value.dtype for value in written.values()} == {torch.float16}
