"""Which kind of model file a set of keys is: what lora-train refuses, and how far a UNet is from SDXL base's shape.

Only key names and a few shapes are read, never weights. The names are facts gathered from diffusers'
single-file loader (`CHECKPOINT_KEY_NAMES`), ComfyUI's model detection, kohya sd-scripts' SDXL
conversion, LyCORIS and the Stability ModelSpec. Each recogniser returns the refusal's text (what the
file looks like and what to give instead) or None; `checkpoint_file` prefixes the file's label.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
FIRST_UNET_KEY = UNET_PREFIX + "input_blocks.0.0.weight"  # conv_in: every LDM UNet has it
LABEL_EMB_KEY = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's size/crop conditioning; SD1.x and 2.x have none
SDXL_ONLY = "lora-train trains SDXL base-family models only; give one (a single-file checkpoint or a diffusers folder)"

# Key fragments of adapter files in each naming scheme, the specific kinds first: LyCORIS files share kohya's
# `lora_unet_` prefix. LoHa `hada_w1_a`, LoKr `lokr_w1`, OFT; kohya and A1111 `.lora_down.`, PEFT `.lora_A.`,
# old diffusers `.lora.down.`; kohya's `.alpha` beside them.
ADAPTER_MARKERS = (
    ("hada_w1_", "LyCORIS LoHa adapter"), ("lokr_w1", "LyCORIS LoKr adapter"),
    ("oft_blocks", "OFT adapter"), ("oft_diag", "OFT adapter"),
    (".lora_down.", "LoRA"), (".lora_up.", "LoRA"), (".lora_A.", "LoRA"), (".lora_B.", "LoRA"),
    (".lora.down.", "LoRA"), (".lora.up.", "LoRA"), ("lora_unet_", "LoRA"), ("lora_te", "LoRA"),
)  # fmt: skip
# Textual-inversion embeddings: SDXL's `clip_l`/`clip_g`, SD1.x's `emb_params` or A1111's `string_to_param.*`.
EMBEDDING_KEYS = ("clip_l", "clip_g", "emb_params")
# Other families, by a key part found at the top or under any prefix (ComfyUI, diffusers single-file).
OTHER_FAMILIES = (
    (("joint_blocks.",), "a Stable Diffusion 3 / 3.5 model (MMDiT joint_blocks.*), not SDXL"),
    (
        ("double_blocks.", "single_blocks.", "single_transformer_blocks."),
        "a Flux model (double_blocks.* / single_blocks.*), not SDXL",
    ),
    (("double_layers.", "cond_seq_linear."), "an AuraFlow model (double_layers.*), not SDXL"),
    (("clip_txt_mapper.", "clip_mapper.", "clf.1."), "a Stable Cascade stage (clip_txt_mapper.* / clf.*), not SDXL"),
    (("y_embedder.y_embedding", "t_block."), "a PixArt or Sana model (t_block.*, y_embedder.*), not SDXL"),
    (("mlp_t5.",), "a Hunyuan-DiT model (mlp_t5.*), not SDXL"),
    (("control_model.", "controlnet_cond_embedding.", "input_hint_block."), "a ControlNet, not a base model"),
)
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
DIFFUSERS_UNET_PARTS = ("conv_in.", "down_blocks.", "mid_block.", "up_blocks.", "time_embedding.")
DIFFUSERS_PIPELINE_PARTS = ("unet.", "text_encoder.", "text_encoder_2.", "vae.")

# SDXL base 1.0's UNet, as widths: (what, key under the UNet prefix, dimension, size).
SDXL_BASE_WIDTHS = (
    ("input channels", "input_blocks.0.0.weight", 1, 4),
    ("model channels", "input_blocks.0.0.weight", 0, 320),
    ("level 1 width", "input_blocks.1.0.out_layers.3.bias", 0, 320),
    ("level 2 width", "input_blocks.4.0.out_layers.3.bias", 0, 640),
    ("level 3 width", "input_blocks.7.0.out_layers.3.bias", 0, 1280),
    ("label_emb input width", "label_emb.0.0.weight", 1, 2816),
)
SDXL_BASE_CONTEXT = 2048  # CLIP-L's 768 and OpenCLIP bigG's 1280, concatenated
SDXL_BASE_BLOCKS = {"input_blocks": 9, "output_blocks": 9}
# Transformer blocks per LDM block; blocks not named have none (input_blocks 0-3 and 6, output_blocks 6-8).
SDXL_BASE_DEPTHS = {
    "input_blocks.4": 2, "input_blocks.5": 2, "input_blocks.7": 10, "input_blocks.8": 10, "middle_block": 10,
    "output_blocks.0": 10, "output_blocks.1": 10, "output_blocks.2": 10,
    "output_blocks.3": 2, "output_blocks.4": 2, "output_blocks.5": 2,
}  # fmt: skip
TRANSFORMER_BLOCK = re.compile(
    r"^model\.diffusion_model\.((?:input|output)_blocks\.\d+|middle_block)\.\d+\.transformer_blocks\.(\d+)\."
)
LDM_BLOCK = re.compile(r"^model\.diffusion_model\.((?:input|output)_blocks)\.(\d+)\.")


def foreign_file(shapes: Shapes, metadata: Mapping[str, str]) -> str | None:
    """The refusal for anything that is not an LDM-layout UNet checkpoint: adapters, other families, layouts."""
    if not shapes:
        return "holds no tensors; give an SDXL checkpoint"
    keys = list(shapes)
    return (
        _adapter(keys, metadata.get("modelspec.architecture", ""))
        or _other_family(keys)
        or _other_layout(keys)
        or (None if FIRST_UNET_KEY in shapes else _no_unet(keys))
    )


def sdxl_family_refusal(shapes: Shapes) -> str | None:
    """The refusal for an LDM UNet checkpoint that is not SDXL base-family: SD1.x/2.x, refiner, EDM, inpainting."""
    context = cross_attention_width(shapes)
    width = f", cross-attention width {context}" if context else ""
    if _has_prefix(shapes, "cond_stage_model.transformer."):
        clip = f"CLIP-L text encoder cond_stage_model.transformer.*{width}"
        return f"looks like a Stable Diffusion 1.x checkpoint ({clip}), not SDXL; {SDXL_ONLY}"
    if _has_prefix(shapes, "cond_stage_model.model."):
        clip = f"OpenCLIP-H text encoder cond_stage_model.model.*{width}"
        return f"looks like a Stable Diffusion 2.x checkpoint ({clip}), not SDXL; {SDXL_ONLY}"
    if LABEL_EMB_KEY not in shapes:
        family = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(context or 0, "SD1.x/2.x-style")
        return f"looks like a {family} UNet (no label_emb size conditioning{width}), not SDXL; {SDXL_ONLY}"
    return _refiner(shapes) or _edm(shapes) or _extra_input_channels(shapes)


def base_shape_differences(shapes: Shapes) -> list[str]:
    """How an SDXL-family UNet's widths and transformer depths differ from SDXL base 1.0's; empty when equal."""
    differences = []
    for what, key, dimension, expected in SDXL_BASE_WIDTHS:
        size = _dim(shapes, UNET_PREFIX + key, dimension)
        if size is None:
            differences.append(f"{what} unknown (no {key})")
        elif size != expected:
            differences.append(f"{what} {size} (SDXL base: {expected})")
    context = cross_attention_width(shapes)
    if context != SDXL_BASE_CONTEXT:
        differences.append(f"cross-attention width {context} (SDXL base: {SDXL_BASE_CONTEXT})")
    blocks = _block_counts(shapes)
    for name, count in SDXL_BASE_BLOCKS.items():
        if blocks.get(name, 0) != count:
            differences.append(f"{blocks.get(name, 0)} {name} (SDXL base: {count})")
    depths = transformer_depths(shapes)
    for block in sorted(set(depths) | set(SDXL_BASE_DEPTHS), key=_block_order):
        found, expected = depths.get(block, 0), SDXL_BASE_DEPTHS.get(block, 0)
        if found != expected:
            differences.append(f"{block}: {found} transformer blocks (SDXL base: {expected})")
    return differences


def not_base_shaped(differences: list[str]) -> str:
    """The refusal for a UNet whose shape SDXL base's configs do not describe, with its first differences."""
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
    return (
        f"looks like an SDXL-family UNet with other widths or depths than SDXL base ({shown}), as distilled models "
        "such as SSD-1B or Vega have; SDXL base's configs do not fit it: set `model.config` to a diffusers folder "
        "(or hub id) that describes it"
    )


def cross_attention_width(shapes: Shapes) -> int | None:
    """The text-embedding width the UNet attends to (768 SD1.x, 1024 SD2.x, 2048 SDXL, 1280 refiner)."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def transformer_depths(shapes: Shapes) -> dict[str, int]:
    """Transformer blocks per LDM block (`input_blocks.4`, `middle_block`, ...), counted from key names alone."""
    return _distinct_indices(shapes, TRANSFORMER_BLOCK)


def _adapter(keys: list[str], architecture: str) -> str | None:
    """A LoRA or LyCORIS file (or an embedding) given where a base model belongs."""
    kind, example = _adapter_kind(keys)
    if kind is None and architecture.endswith(("/lora", "-lora")):  # kohya writes `.../lora`, the spec `...-lora`
        kind, example = "LoRA", f"modelspec.architecture {architecture}"
    if kind:
        usage = "give it to `sample --lora`, and " if kind == "LoRA" else ""
        return f"is a {kind}, not a base model ({example}); {usage}set `model.pretrained` to the base model it was made for"
    embedding = all(key in EMBEDDING_KEYS or key.startswith("string_to_param.") for key in keys)
    if embedding or architecture.endswith(("/textual-inversion", "-textual-inversion")):
        return "is a textual-inversion embedding, not a base model; set `model.pretrained` to the base model it was made for"
    return None


def _adapter_kind(keys: list[str]) -> tuple[str | None, str | None]:
    """The adapter kind and one key that shows it, or (None, None) for a file without adapter keys."""
    for marker, kind in ADAPTER_MARKERS:
        if example := next((key for key in keys if marker in key), None):
            return kind, example
    example = next((key for key in keys if key.endswith(".alpha")), None)
    return ("LoRA", example) if example else (None, None)


def _other_family(keys: list[str]) -> str | None:
    for parts, what in OTHER_FAMILIES:
        if any(key.startswith(part) or f".{part}" in key for key in keys for part in parts):
            return f"looks like {what}; {SDXL_ONLY}"
    return None


def _other_layout(keys: list[str]) -> str | None:
    """A VAE alone, or diffusers' layout (a UNet's or a pipeline's) where the original layout was expected."""
    if all(key.startswith(VAE_PARTS) for key in keys):
        return (
            "looks like a VAE alone (encoder.* / decoder.* keys), not a whole model; give it as `model.vae` and set "
            "`model.pretrained` to the SDXL model"
        )
    if any(key.startswith(DIFFUSERS_UNET_PARTS) for key in keys):
        return (
            "is a diffusers-layout UNet file (conv_in.*, down_blocks.*), not a single-file checkpoint; give the "
            "diffusers folder it belongs to (the one with model_index.json) instead"
        )
    if any(key.startswith(DIFFUSERS_PIPELINE_PARTS) and not key.startswith(UNET_PREFIX) for key in keys):
        return (
            "is a diffusers-layout pipeline file (unet.*, text_encoder.*), not a single-file checkpoint; "
            "give the diffusers folder instead"
        )
    return None


def _no_unet(keys: list[str]) -> str:
    """Anything else, said with what its keys do show: a nesting prefix, another family's model, their first parts."""
    no_unet = "does not look like an SDXL checkpoint (no model.diffusion_model.* UNet keys"
    nested = next((key[: key.index("." + UNET_PREFIX) + 1] for key in keys if "." + UNET_PREFIX in key), None)
    if nested:
        return f"{no_unet} at the top: they sit under {nested!r}); save it again without that prefix"
    if any(key.startswith(UNET_PREFIX) for key in keys):
        return f"{no_unet}: model.diffusion_model.* holds no input_blocks, so it is another family's model); {SDXL_ONLY}"
    starts = ", ".join(repr(start) for start in sorted({key.split(".")[0] + "." for key in keys})[:3])
    return f"{no_unet}; its keys begin {starts}); {SDXL_ONLY}"


def _refiner(shapes: Shapes) -> str | None:
    """SDXL's refiner: OpenCLIP bigG alone as `conditioner.embedders.0.model`, a 384-wide UNet, label_emb 2560 in."""
    signs = []
    if _has_prefix(shapes, "conditioner.embedders.0.model."):
        signs.append("one OpenCLIP text encoder conditioner.embedders.0.model.*")
    if _dim(shapes, FIRST_UNET_KEY, 0) == 384 and _dim(shapes, LABEL_EMB_KEY, 1) == 2560:
        signs.append("model channels 384, label_emb input width 2560")
    if not signs:
        return None
    signs_said = "; ".join(signs)
    return f"looks like an SDXL refiner ({signs_said}), not a base model; train on SDXL base or a finetune of it instead"


def _edm(shapes: Shapes) -> str | None:
    """An SDXL-shaped model trained with an EDM (continuous sigma) objective, which lora-train's DDPM loss does not fit."""
    keys = sorted(key for key in shapes if key.startswith("edm_"))
    if not keys:
        return None
    if any(key.startswith("edm_vpred.") for key in keys):
        like = "EDM v-prediction, such as CosXL"
    elif "edm_mean" in keys or "edm_std" in keys:
        like = "EDM, such as Playground v2.5"
    else:
        like = "EDM"
    return (
        f"looks like an SDXL-shaped model trained with {like} ({', '.join(keys[:2])} keys); lora-train's DDPM "
        "objective does not fit it: train on an SDXL base-family model with SDXL's DDPM schedule instead"
    )


def _extra_input_channels(shapes: Shapes) -> str | None:
    """Inpainting (latents + mask + masked image = 9) and instruct-pix2pix / edit (latents + source = 8) UNets."""
    channels = _dim(shapes, FIRST_UNET_KEY, 1)
    kinds = {9: "an SDXL inpainting UNet (9 input channels: latents, mask and masked image)",
             8: "an SDXL instruct-pix2pix / edit UNet (8 input channels: latents and the source image's)"}  # fmt: skip
    if channels not in kinds:
        return None
    return (
        f"looks like {kinds[channels]}; lora-train trains 4-channel text-to-image models: give the SDXL base-family model instead"
    )


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _dim(shapes: Shapes, key: str, dimension: int) -> int | None:
    shape = shapes.get(key)
    return shape[dimension] if shape is not None and len(shape) > dimension else None


def _block_counts(shapes: Shapes) -> dict[str, int]:
    return _distinct_indices(shapes, LDM_BLOCK)


def _distinct_indices(shapes: Shapes, pattern: re.Pattern[str]) -> dict[str, int]:
    """For keys matching `pattern` (group 1: a name, group 2: an index), how many distinct indices each name has."""
    found: dict[str, set[str]] = {}
    for key in shapes:
        if match := pattern.match(key):
            found.setdefault(match[1], set()).add(match[2])
    return {name: len(indices) for name, indices in found.items()}


def _block_order(block: str) -> tuple[int, int]:
    # input_blocks, then middle_block, then output_blocks, each by index: the order a reader expects.
    group, _, index = block.partition(".")
    return ({"input_blocks": 0, "middle_block": 1}.get(group, 2), int(index or 0))
