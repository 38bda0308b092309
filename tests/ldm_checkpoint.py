"""Write a diffusers SDXL folder as ONE single-file checkpoint in Stability's original (LDM / sgm) layout.

Model sites ship SDXL checkpoints (Pony, Illustrious, ...) this way, so tests that load such a file
need one; this helper makes it from a diffusers folder such as `builtin:tiny-sdxl`.

Where the key mapping comes from (facts about names; the code here is ours):

- diffusers' `scripts/convert_diffusers_to_original_sdxl.py` (huggingface/diffusers), which does this
  conversion for SDXL's fixed sizes only (three levels, two resnets per down level, hard-coded
  indices); and its reverse, `diffusers/loaders/single_file_utils.py` (`DIFFUSERS_TO_LDM_MAPPING`,
  `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
  `convert_open_clip_checkpoint`, `CHECKPOINT_KEY_NAMES`), which is what diffusers' `from_single_file`
  runs and so what the test loads our file back with.
- Stability-AI/generative-models: `configs/inference/sd_xl_base.yaml` (the checkpoint's four parts:
  `model.diffusion_model` = `sgm.modules.diffusionmodules.openaimodel.UNetModel`, `first_stage_model` =
  the KL autoencoder of `sgm/modules/diffusionmodules/model.py`, `conditioner.embedders.0` =
  `FrozenCLIPEmbedder` (a transformers CLIPTextModel under `.transformer`) and `conditioner.embedders.1`
  = `FrozenOpenCLIPEmbedder2` (an open_clip text tower under `.model`)).

The layout, as general rules over the diffusers configs (not SDXL's sizes):

- UNet (`model.diffusion_model.`): `time_embed.{0,2}` (linear, SiLU, linear), `label_emb.0.{0,2}` (SDXL's
  "sequential" ADM embedding, diffusers' `add_embedding` / `class_embedding`), `input_blocks.0.0` =
  `conv_in`; then, level by level, one input block per resnet (`.0` the ResBlock, `.1` its transformer if
  the level has attentions) and one more block `.0.op` for the level's downsampler. `middle_block.{0,1,2}`
  = resnet, transformer, resnet. Output blocks go the same way over the up levels (`layers_per_block + 1`
  resnets each), the level's upsampler sitting in its last block after the resnet (`.1.conv`) or after
  the transformer (`.2.conv`). `out.{0,2}` = `conv_norm_out`, `conv_out`. ResBlock parts: `in_layers.0` /
  `in_layers.2` / `emb_layers.1` / `out_layers.0` / `out_layers.3` / `skip_connection` for diffusers'
  `norm1` / `conv1` / `time_emb_proj` / `norm2` / `conv2` / `conv_shortcut`. Transformer names are the same
  on both sides.
- VAE (`first_stage_model.`): `encoder.down.{i}.block.{j}` / `encoder.down.{i}.downsample.conv`,
  `{encoder,decoder}.mid.block_1`, `.mid.attn_1`, `.mid.block_2`, `norm_out` for `conv_norm_out`,
  `nin_shortcut` for `conv_shortcut`; the decoder's `up.{k}` counts levels from the highest resolution, so
  diffusers' `up_blocks.{i}` is `up.{n-1-i}`. The mid attention is `norm`, `q`, `k`, `v`, `proj_out`, its
  four weights stored as 1x1 convolutions `[C, C, 1, 1]`. `quant_conv` / `post_quant_conv` as they are.
- CLIP-L (`conditioner.embedders.0.transformer.`): transformers' own names under `text_model.` (added back
  where transformers >= 5.6 saves a flattened `CLIPTextModel` without it).
- OpenCLIP bigG (`conditioner.embedders.1.model.`): `token_embedding.weight`, `positional_embedding`,
  `transformer.resblocks.{n}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}` (q, k, v concatenated in that order along dim 0), `ln_final`, and
  `text_projection` = transformers' `text_projection.weight` transposed (`[width, projection_dim]`).
  open_clip's `logit_scale` has no transformers counterpart; pass it in `extra_tensors` if wanted.

Every tensor of the folder must land on exactly one checkpoint key; anything this mapping does not know
raises, so a new diffusers or transformers layout fails here rather than writing a partial file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
# New diffusers names, and the names of diffusers folders saved before its attention processor rewrite.
_VAE_ATTENTION_PARTS = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
    "query.": "q.",
    "key.": "k.",
    "value.": "v.",
    "proj_attn.": "proj_out.",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_in.": "encoder.conv_in.",
    "encoder.conv_out.": "encoder.conv_out.",
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_in.": "decoder.conv_in.",
    "decoder.conv_out.": "decoder.conv_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
    "quant_conv.": "quant_conv.",
    "post_quant_conv.": "post_quant_conv.",
}
_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_OPEN_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def write_ldm_checkpoint(
    diffusers_folder: Path,
    out_file: Path,
    *,
    include_vae: bool = True,
    include_text_encoders: bool = True,
    dtype: torch.dtype | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write the SDXL pipeline in `diffusers_folder` as one LDM-layout safetensors file at `out_file`.

    The UNet is always written; the VAE and both text encoders unless told not to. `dtype` casts the
    floating-point tensors (None keeps the folder's). `extra_tensors` are added last under their own
    names (so one named like a converted key replaces it), e.g. `{"v_pred": torch.tensor([])}`.
    `metadata` goes into the safetensors header; values that are not strings are written as JSON.
    """
    diffusers_folder = Path(diffusers_folder)
    out_file = Path(out_file)
    unet_config = json.loads((diffusers_folder / "unet" / "config.json").read_text(encoding="utf-8"))
    checkpoint = _prefixed(UNET_PREFIX, unet_to_ldm(_load_weights(diffusers_folder / "unet"), unet_config))
    if include_vae:
        vae_config = json.loads((diffusers_folder / "vae" / "config.json").read_text(encoding="utf-8"))
        checkpoint.update(_prefixed(VAE_PREFIX, vae_to_ldm(_load_weights(diffusers_folder / "vae"), vae_config)))
    if include_text_encoders:
        checkpoint.update(_prefixed(CLIP_L_PREFIX, clip_l_to_ldm(_load_weights(diffusers_folder / "text_encoder"))))
        checkpoint.update(
            _prefixed(OPEN_CLIP_PREFIX, open_clip_to_ldm(_load_weights(diffusers_folder / "text_encoder_2")))
        )
    if dtype is not None:
        checkpoint = {key: value.to(dtype) if value.is_floating_point() else value for key, value in checkpoint.items()}
    checkpoint.update(extra_tensors or {})
    checkpoint = {key: value.contiguous() for key, value in checkpoint.items()}
    header = None
    if metadata:
        header = {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, str(out_file), metadata=header)
    return out_file


def _load_weights(component: Path) -> dict[str, torch.Tensor]:
    """A component folder's tensors: one safetensors file or shards listed in an index."""
    for stem in ("diffusion_pytorch_model", "model"):
        single = component / f"{stem}.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = component / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(load_file(str(component / shard)))
            return weights
    raise FileNotFoundError(f"no safetensors weights in {component}")


def _prefixed(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in weights.items()}


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _rename_one(key: str, table: dict[str, str]) -> str:
    """`key` with the first table entry it starts with replaced; KeyError if none."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


def _convert(weights: dict[str, torch.Tensor], prefixes: list[tuple[str, str, dict[str, str] | None]], what: str):
    """Map every key by the longest matching diffusers prefix, renaming what follows it with the part table."""
    ordered = sorted(prefixes, key=lambda entry: len(entry[0]), reverse=True)
    converted: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        for old, new, parts in ordered:
            if key.startswith(old):
                rest = key[len(old) :]
                if parts:
                    rest = next((rest.replace(a, b, 1) for a, b in parts.items() if rest.startswith(a)), rest)
                new_key = new + rest
                break
        else:
            raise KeyError(f"{what}: no LDM name for {key!r}")
        if new_key in converted:
            raise KeyError(f"{what}: two tensors map to {new_key!r}")
        converted[new_key] = value
    return converted


def unet_to_ldm(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in openaimodel.UNetModel names (without the prefix)."""
    down_levels = len(config["down_block_types"])
    up_levels = len(config["up_block_types"])
    layers_down = _per_level(config["layers_per_block"], down_levels)
    layers_up = [count + 1 for count in reversed(layers_down)]

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in weights)

    prefixes: list[tuple[str, str, dict[str, str] | None]] = [(old, new, None) for old, new in _UNET_TOP_LEVEL.items()]
    block = 1
    for level in range(down_levels):
        for layer in range(layers_down[level]):
            prefixes.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{block}.0.", _UNET_RESNET_PARTS))
            prefixes.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{block}.1.", None))
            block += 1
        if has(f"down_blocks.{level}.downsamplers.0."):
            prefixes.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", None))
            block += 1
    mid_resnets = {int(match.group(1)) for key in weights if (match := re.match(r"mid_block\.resnets\.(\d+)\.", key))}
    for index in sorted(mid_resnets):
        prefixes.append((f"mid_block.resnets.{index}.", f"middle_block.{2 * index}.", _UNET_RESNET_PARTS))
        prefixes.append((f"mid_block.attentions.{index}.", f"middle_block.{2 * index + 1}.", None))
    block = 0
    for level in range(up_levels):
        for layer in range(layers_up[level]):
            prefixes.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{block}.0.", _UNET_RESNET_PARTS))
            attention = f"up_blocks.{level}.attentions.{layer}."
            prefixes.append((attention, f"output_blocks.{block}.1.", None))
            if layer == layers_up[level] - 1 and has(f"up_blocks.{level}.upsamplers.0."):
                slot = 2 if has(attention) else 1
                prefixes.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{block}.{slot}.", None))
            block += 1
    return _convert(weights, prefixes, "UNet")


def vae_to_ldm(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the sgm autoencoder's names (without the prefix)."""
    levels = len(config["down_block_types"])
    up_levels = len(config["up_block_types"])
    prefixes: list[tuple[str, str, dict[str, str] | None]] = [(old, new, None) for old, new in _VAE_TOP_LEVEL.items()]
    for level in range(levels):
        prefixes.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", None))
        prefixes.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", None))
    for level in range(up_levels):
        ldm_level = up_levels - 1 - level
        prefixes.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{ldm_level}.block.", None))
        prefixes.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{ldm_level}.upsample.", None))
    for part in ("encoder", "decoder"):
        prefixes.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", None))
        prefixes.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", None))
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION_PARTS))
    converted = _convert(weights, prefixes, "VAE")
    result = {}
    for key, value in converted.items():
        # The resnet shortcut is `nin_shortcut` in sgm, wherever it sits.
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        result[key] = value
    return result


def clip_l_to_ldm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel's tensors under `text_model.`, as FrozenCLIPEmbedder's `transformer` holds them."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in weights.items()}


def open_clip_to_ldm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection's tensors in open_clip's text-tower names (q, k, v fused)."""
    converted: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()
        elif name == "embeddings.position_ids":
            continue  # a transformers buffer; open_clip has none
        elif name in _OPEN_CLIP_TOP_LEVEL:
            converted[_OPEN_CLIP_TOP_LEVEL[name]] = value
        elif match := _OPEN_CLIP_QKV.fullmatch(name):
            layer, projection, kind = match.groups()
            fused.setdefault((layer, kind), {})[projection] = value
        elif match := _OPEN_CLIP_LAYER.fullmatch(name):
            layer, rest = match.groups()
            try:
                converted[f"transformer.resblocks.{layer}.{_rename_one(rest, _OPEN_CLIP_LAYER_PARTS)}"] = value
            except KeyError:
                raise KeyError(f"OpenCLIP: no open_clip name for {key!r}") from None
        else:
            raise KeyError(f"OpenCLIP: no open_clip name for {key!r}")
    for (layer, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"OpenCLIP: layer {layer} has only {sorted(parts)} of q, k, v ({kind})")
        converted[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return converted
