"""A model file is known from its safetensors header before any weight is read, and refused in one line.

The fake checkpoints here carry the KEYS and SHAPES of each family (facts from diffusers' single-file
loader, ComfyUI's model detection, kohya sd-scripts and the ModelSpec) over a data region that is a
hole in a sparse file: a "6 GB" checkpoint costs a few kilobytes of disk and nothing is ever read.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_trainer.errors import ModelFileError
from lora_trainer.model import checkpoint_file
from lora_trainer.model.checkpoint_file import TensorInfo, inspect_sdxl_checkpoint, read_safetensors_header

U = "model.diffusion_model."
ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I64": 8}
# SDXL base 1.0: transformer blocks per LDM block (kohya's sdxl_model_util, ComfyUI's SDXL config).
SDXL_DEPTHS = {
    "input_blocks.4": 2, "input_blocks.5": 2, "input_blocks.7": 10, "input_blocks.8": 10, "middle_block": 10,
    **{f"output_blocks.{i}": 10 for i in (0, 1, 2)}, **{f"output_blocks.{i}": 2 for i in (3, 4, 5)},
}  # fmt: skip
TEXT_ENCODERS = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
}
VAE = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3), "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}


def sdxl_unet(widths=(320, 640, 1280), context=2048, adm=2816, in_channels=4, depths=SDXL_DEPTHS) -> dict:
    """An LDM-layout SDXL UNet's keys: real shapes where classification reads them, (1,) elsewhere."""
    level = {**{f"input_blocks.{i}": widths[(i - 1) // 3] for i in (1, 2, 4, 5, 7, 8)},
             **{f"output_blocks.{i}": widths[2 - i // 3] for i in range(9)}, "middle_block": widths[2]}  # fmt: skip
    shapes = {
        U + "input_blocks.0.0.weight": (widths[0], in_channels, 3, 3),
        U + "time_embed.0.weight": (widths[0] * 4, widths[0]),
        U + "label_emb.0.0.weight": (widths[0] * 4, adm),
        U + "input_blocks.3.0.op.weight": (1,),
        U + "input_blocks.6.0.op.weight": (1,),
        U + "middle_block.0.in_layers.0.weight": (1,),
        U + "middle_block.2.in_layers.0.weight": (1,),
        U + "out.2.weight": (4, widths[0], 3, 3),
    }
    for block, width in level.items():
        if block != "middle_block":
            shapes[f"{U}{block}.0.in_layers.0.weight"] = (1,)
            shapes[f"{U}{block}.0.out_layers.3.bias"] = (width,)
        for n in range(depths.get(block, 0)):
            shapes[f"{U}{block}.1.transformer_blocks.{n}.attn1.to_q.weight"] = (1,)
            shapes[f"{U}{block}.1.transformer_blocks.{n}.attn2.to_k.weight"] = (width, context)
    return shapes


def sdxl_checkpoint(**unet) -> dict:
    return {**sdxl_unet(**unet), **TEXT_ENCODERS, **VAE}


def write_header_only(path: Path, shapes: dict, metadata: dict | None = None, dtype: str = "F16") -> Path:
    """A valid safetensors file with this header and a sparse (all-zero, unwritten) data region."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * ITEM_BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def inspect_file(path: Path, **options):
    tensors, metadata = read_safetensors_header(path)
    return inspect_sdxl_checkpoint(label(path), tensors, metadata, **options)


def label(path: Path) -> str:
    return f"model.pretrained: {path}"


def refusal(call, prefix: str) -> str:
    """The one-line message `call` refuses with, checked to be a ModelFileError (exit code 2) starting with `prefix`."""
    with pytest.raises(ModelFileError) as caught:
        call()
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "\n" not in message, message
    assert message.startswith(prefix + ": "), message
    return message


# --- SDXL base-family checkpoints are accepted, with what they say about themselves --------------------------


def test_a_base_shaped_checkpoint_is_accepted(tmp_path):
    facts = inspect_file(write_header_only(tmp_path / "base.safetensors", sdxl_checkpoint()))
    assert facts.sdxl_base_shape and facts.has_vae and facts.has_text_encoders
    assert facts.prediction_type is None and not facts.zero_terminal_snr
    assert facts.description == "SDXL base-shaped checkpoint"


def test_the_fake_files_are_real_safetensors_files(tmp_path):
    shapes = sdxl_checkpoint()
    path = write_header_only(tmp_path / "base.safetensors", shapes, {"modelspec.title": "fake"})
    with safe_open(path, framework="pt") as handle:
        assert set(handle.keys()) == set(shapes)
        assert handle.metadata() == {"modelspec.title": "fake"}
        assert tuple(handle.get_slice(U + "label_emb.0.0.weight").get_shape()) == (1280, 2816)


def test_the_header_says_what_safetensors_itself_reads(tmp_path):
    tensors = {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(5, dtype=torch.bfloat16),
               "c": torch.zeros(1, 1, 4, dtype=torch.float32), "d": torch.zeros(3, dtype=torch.int64), "v_pred": torch.zeros(0)}  # fmt: skip
    save_file(tensors, tmp_path / "small.safetensors", metadata={"modelspec.prediction_type": "v", "note": "x"})
    infos, metadata = read_safetensors_header(tmp_path / "small.safetensors")
    assert infos == {"a": TensorInfo((2, 3), "F16"), "b": TensorInfo((5,), "BF16"), "c": TensorInfo((1, 1, 4), "F32"),
                     "d": TensorInfo((3,), "I64"), "v_pred": TensorInfo((0,), "F32")}  # fmt: skip
    assert metadata == {"modelspec.prediction_type": "v", "note": "x"}


def test_v_pred_and_ztsnr_keys_say_v_prediction_with_zero_terminal_snr(tmp_path):
    # kohya / ComfyUI / NoobAI mark a v-prediction checkpoint with empty tensors named `v_pred` and `ztsnr`.
    path = write_header_only(tmp_path / "vpred.safetensors", {**sdxl_checkpoint(), "v_pred": (0,), "ztsnr": (0,)})
    facts = inspect_file(path)
    assert facts.prediction_type == "v_prediction" and facts.zero_terminal_snr
    assert facts.description == "SDXL base-shaped checkpoint (v-prediction, zero-terminal SNR)"


@pytest.mark.parametrize(
    ("metadata", "prediction_type", "zero_terminal_snr"),
    [
        ({"modelspec.prediction_type": "v"}, "v_prediction", False),  # the ModelSpec spelling
        ({"modelspec.prediction_type": "epsilon"}, "epsilon", False),
        ({"modelspec.prediction_type": "v_prediction"}, "v_prediction", False),
        ({"modelspec.predict_key": "v"}, "v_prediction", False),  # what ComfyUI's checkpoint save writes
        ({"modelspec.predict_key": "epsilon", "ss_zero_terminal_snr": "True"}, "epsilon", True),  # kohya's training flag
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base"}, None, False),
    ],
)
def test_modelspec_metadata_says_the_prediction_type(tmp_path, metadata, prediction_type, zero_terminal_snr):
    facts = inspect_file(write_header_only(tmp_path / "m.safetensors", sdxl_checkpoint(), metadata))
    assert (facts.prediction_type, facts.zero_terminal_snr) == (prediction_type, zero_terminal_snr)


def test_a_unet_only_checkpoint_is_accepted_and_says_what_it_lacks(tmp_path):
    facts = inspect_file(write_header_only(tmp_path / "unet.safetensors", sdxl_unet()))
    assert facts.sdxl_base_shape and not facts.has_vae and not facts.has_text_encoders
    assert facts.description == "SDXL base-shaped checkpoint (no VAE, no text encoders)"


def test_a_pickled_state_dict_is_classified_from_its_keys_and_shapes():
    # The loader builds TensorInfo from a torch.load()ed dict; nothing here needs a file.
    tensors = {key: TensorInfo(shape, "F16") for key, shape in sdxl_checkpoint(in_channels=9).items()}
    message = refusal(lambda: inspect_sdxl_checkpoint("model.pretrained: x.ckpt", tensors, {}), "model.pretrained: x.ckpt")
    assert "inpainting UNet (9 input channels" in message
    tensors = {key: TensorInfo(shape, "F16") for key, shape in sdxl_checkpoint().items()}
    assert inspect_sdxl_checkpoint("x.ckpt", tensors, {}).sdxl_base_shape


# --- other widths and depths: refused for SDXL base's configs, accepted with model.config ----------------------

SSD_1B_LIKE = {**SDXL_DEPTHS, "input_blocks.7": 4, "input_blocks.8": 4, "middle_block": 0, "output_blocks.0": 4}
TINY = {"widths": (32, 64, 128), "context": 96, "adm": 112, "depths": {block: 1 for block in SDXL_DEPTHS}}


def test_a_distilled_sdxl_is_refused_against_sdxl_base_configs(tmp_path):
    path = write_header_only(tmp_path / "ssd.safetensors", sdxl_checkpoint(depths=SSD_1B_LIKE))
    message = refusal(lambda: inspect_file(path), label(path))
    assert "other widths or depths than SDXL base (input_blocks.7: 4 transformer blocks (SDXL base: 10);" in message
    assert "SSD-1B" in message and "`model.config`" in message


@pytest.mark.parametrize("unet", [{"depths": SSD_1B_LIKE}, TINY], ids=["distilled", "tiny"])
def test_other_widths_and_depths_are_accepted_when_the_user_describes_the_model(tmp_path, unet):
    path = write_header_only(tmp_path / "other.safetensors", sdxl_checkpoint(**unet))
    facts = inspect_file(path, require_base_shape=False)
    assert not facts.sdxl_base_shape and facts.has_vae and facts.has_text_encoders
    assert facts.description == "SDXL-family checkpoint with other widths or depths than SDXL base"


def test_the_tiny_model_is_refused_against_sdxl_base_configs_with_its_widths(tmp_path):
    path = write_header_only(tmp_path / "tiny.safetensors", sdxl_checkpoint(**TINY))
    message = refusal(lambda: inspect_file(path), label(path))
    assert "(model channels 32 (SDXL base: 320); level 1 width 32 (SDXL base: 320); level 2 width 64" in message


# --- everything lora-train cannot train on, each in one line that says what the file looks like --------------

SD15 = {
    U + "input_blocks.0.0.weight": (320, 4, 3, 3),
    U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    U + "output_blocks.11.0.skip_connection.weight": (1,),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    **VAE,
}
SD2 = {
    U + "input_blocks.0.0.weight": (320, 4, 3, 3),
    U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "cond_stage_model.model.token_embedding.weight": (1,),
    **VAE,
}
REFINER_TEXT = {"conditioner.embedders.0.model.text_projection": (1,), "conditioner.embedders.0.model.positional_embedding": (1,)}
KOHYA_LORA = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
REFUSED = {
    "sd15": (SD15, "looks like a Stable Diffusion 1.x checkpoint (CLIP-L text encoder cond_stage_model.transformer.*, cross-attention width 768)"),
    "sd15-unet": ({k: v for k, v in SD15.items() if k.startswith(U)}, "looks like a Stable Diffusion 1.x UNet (no label_emb"),
    "sd2": (SD2, "looks like a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder cond_stage_model.model.*, cross-attention width 1024)"),
    "refiner": ({**sdxl_unet(widths=(384, 768, 1536), context=1280, adm=2560), **REFINER_TEXT, **VAE}, "looks like an SDXL refiner (one OpenCLIP"),
    "refiner-unet": (sdxl_unet(widths=(384, 768, 1536), context=1280, adm=2560), "looks like an SDXL refiner (model channels 384, label_emb input width 2560)"),
    "inpainting": (sdxl_checkpoint(in_channels=9), "looks like an SDXL inpainting UNet (9 input channels"),
    "pix2pix": (sdxl_checkpoint(in_channels=8), "instruct-pix2pix / edit UNet (8 input channels"),
    "playground": ({**sdxl_checkpoint(), "edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)}, "EDM, such as Playground v2.5 (edm_mean, edm_std keys); lora-train's DDPM objective does not fit it"),
    "cosxl": ({**sdxl_checkpoint(), "edm_vpred.sigma_max": (), "edm_vpred.sigma_min": ()}, "EDM v-prediction, such as CosXL (edm_vpred.sigma_max"),
    "sd3": ({U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (1,), U + "x_embedder.proj.weight": (1,), **VAE}, "looks like a Stable Diffusion 3 / 3.5 model"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (1,)}, "looks like a Flux model"),
    "auraflow": ({"double_layers.0.attn.w1q.weight": (1,), "cond_seq_linear.weight": (1,)}, "looks like an AuraFlow model"),
    "cascade": ({"clip_txt_mapper.weight": (1,), "down_blocks.0.0.channelwise.0.weight": (1,), "clf.1.weight": (1,)}, "looks like a Stable Cascade stage"),
    "pixart": ({"t_block.1.weight": (1,), "y_embedder.y_embedding": (1,), "blocks.0.cross_attn.q_linear.weight": (1,)}, "looks like a PixArt or Sana model"),
    "controlnet": ({"control_model.input_hint_block.0.weight": (1,), "control_model.time_embed.0.weight": (1,)}, "looks like a ControlNet, not a base model"),
    "kohya-lora": ({f"{KOHYA_LORA}.lora_down.weight": (4, 640), f"{KOHYA_LORA}.lora_up.weight": (640, 4), f"{KOHYA_LORA}.alpha": ()},
                   "is a LoRA, not a base model (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight); give it to `sample --lora`"),
    "peft-lora": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 640)}, "is a LoRA, not a base model"),
    "alpha-only": ({f"{KOHYA_LORA}.alpha": ()}, "is a LoRA, not a base model"),
    "loha": ({f"{KOHYA_LORA}.hada_w1_a": (1,), f"{KOHYA_LORA}.alpha": ()}, "is a LyCORIS LoHa adapter, not a base model"),
    "lokr": ({f"{KOHYA_LORA}.lokr_w1": (1,)}, "is a LyCORIS LoKr adapter, not a base model"),
    "embedding": ({"clip_l": (1, 768), "clip_g": (1, 1280)}, "is a textual-inversion embedding, not a base model"),
    "diffusers-unet": ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (1,), "time_embedding.linear_1.weight": (1,)},
                       "is a diffusers-layout UNet file (conv_in.*, down_blocks.*), not a single-file checkpoint; give the diffusers folder"),
    "diffusers-pipeline": ({"unet.conv_in.weight": (1,), "text_encoder.text_model.embeddings.token_embedding.weight": (1,)}, "is a diffusers-layout pipeline file"),
    "vae": ({"encoder.conv_in.weight": (1,), "decoder.conv_out.weight": (1,), "quant_conv.weight": (1,)}, "looks like a VAE alone"),
    "dit-under-unet-prefix": ({U + "cap_embedder.0.weight": (1,), U + "layers.0.attention.qkv.weight": (1,)}, "model.diffusion_model.* holds no input_blocks, so it is another family"),
    "nested-prefix": ({"state_dict." + key: shape for key, shape in sdxl_unet().items()}, "they sit under 'state_dict.'"),
    "unknown": ({"foo.bar.weight": (1,), "baz": (1,)}, "does not look like an SDXL checkpoint (no model.diffusion_model.* UNet keys; its keys begin 'baz.', 'foo.')"),
    "no-tensors": ({}, "holds no tensors"),
}  # fmt: skip


@pytest.mark.parametrize("name", REFUSED)
def test_what_lora_train_cannot_train_on_is_refused_in_one_line(tmp_path, name):
    shapes, phrase = REFUSED[name]
    path = write_header_only(tmp_path / f"{name}.safetensors", shapes)
    assert phrase in refusal(lambda: inspect_file(path), label(path))


@pytest.mark.parametrize("name", ["sd15", "refiner-unet", "inpainting", "playground", "kohya-lora", "diffusers-unet"])
def test_families_are_refused_even_when_the_user_describes_the_model(tmp_path, name):
    shapes, phrase = REFUSED[name]
    path = write_header_only(tmp_path / f"{name}.safetensors", shapes)
    assert phrase in refusal(lambda: inspect_file(path, require_base_shape=False), label(path))


def test_modelspec_architecture_names_a_lora_without_lora_keys(tmp_path):
    path = write_header_only(
        tmp_path / "l.safetensors", {"weird.weight": (1,)}, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    )
    assert "is a LoRA, not a base model (modelspec.architecture stable-diffusion-xl-v1-base/lora)" in refusal(
        lambda: inspect_file(path), label(path)
    )


# --- files that are not safetensors at all, or are cut short --------------------------------------------------


def framed(header: bytes) -> bytes:
    """`header` behind its 8-byte little-endian length, as a safetensors file opens."""
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"", "(0 bytes, too short for a header)"),
        (b"abc", "(3 bytes, too short for a header)"),
        (b"hello world\nthis is a text file\n", "(it is text, starting 'hello world')"),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 6938078334\n",
            "it is a Git LFS pointer, not the weights",
        ),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "it is a web page, not weights"),
        ((1000).to_bytes(8, "little") + b"{}", "(its header length field says 1,000 bytes, but the file holds 10)"),
        ((2**40).to_bytes(8, "little") + b"{}", "over safetensors' 100 MB limit"),
        (framed(b"{not json"), "its header is not valid JSON"),
        (framed(b'{"__metadata__": {"a": "1"}'), "its header is not valid JSON: Expecting ',' delimiter at byte 27"),
        (framed(b"[]"), "its header is JSON but not an object of tensors"),
        (framed(b"\xff\xfe"), "its header is not UTF-8 text"),
        (framed(b'{"x": {"dtype": "F16"}}'), "tensor 'x' in its header has no valid dtype, shape and data_offsets"),
        (framed(b'{"x": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}'), "tensor 'x' in its header has no valid"),
        (framed(b'{"__metadata__": {"a": 1}}'), "its __metadata__ is not a map of strings"),
    ],
)
def test_a_file_that_is_not_safetensors_is_refused_in_one_line(tmp_path, content, phrase):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    message = refusal(lambda: read_safetensors_header(path), str(path))
    assert message.startswith(f"{path}: not a safetensors file (") and phrase in message, message


def test_null_metadata_and_no_tensors_is_still_a_safetensors_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(framed(b'{"__metadata__": null}'))
    assert read_safetensors_header(tmp_path / "empty.safetensors") == ({}, {})


def test_a_pickle_renamed_safetensors_is_called_a_pickle(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "model.safetensors")
    message = refusal(lambda: read_safetensors_header(tmp_path / "model.safetensors"), str(tmp_path / "model.safetensors"))
    assert "not a safetensors file (it is a PyTorch pickle or zip archive" in message


def test_a_truncated_download_is_refused_with_the_sizes(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(1024, dtype=torch.float16), "b": torch.zeros(512, dtype=torch.float32)}, path)
    whole = path.read_bytes()
    header_end = 8 + int.from_bytes(whole[:8], "little")
    path.write_bytes(whole[: len(whole) // 2])
    message = refusal(lambda: read_safetensors_header(path), str(path))
    held = len(whole) // 2 - header_end
    assert (
        message
        == f"{path}: truncated: the header describes 4,096 bytes of tensors but the file holds {held:,}; download it again"
    )


def test_a_missing_file_is_one_line_too(tmp_path):
    assert "cannot read it" in refusal(
        lambda: read_safetensors_header(tmp_path / "nope.safetensors"), str(tmp_path / "nope.safetensors")
    )


# --- the header is all that is read ---------------------------------------------------------------------------


class CountingFile:
    """A read-only file that counts the bytes handed out and allows nothing but read and fileno."""

    def __init__(self, path, mode):
        assert mode == "rb"
        self.handle, self.bytes_read = open(path, mode), 0  # noqa: SIM115 - closed in __exit__
        OPENED.append(self)

    def read(self, size=-1):
        data = self.handle.read(size)
        self.bytes_read += len(data)
        return data

    def fileno(self):
        return self.handle.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


OPENED: list[CountingFile] = []


def test_only_the_header_is_read_even_of_a_huge_file(tmp_path, monkeypatch):
    shapes = {**sdxl_checkpoint(), "padding.weight": (6 * 2**30,)}  # a 6 GiB hole after the tensors that count
    path = write_header_only(tmp_path / "huge.safetensors", shapes, dtype="U8")
    assert path.stat().st_size > 6 * 2**30
    with open(path, "rb") as handle:
        header_bytes = 8 + int.from_bytes(handle.read(8), "little")
    OPENED.clear()
    monkeypatch.setattr(checkpoint_file, "open", CountingFile, raising=False)
    tensors, _ = read_safetensors_header(path)
    assert tensors["padding.weight"] == TensorInfo((6 * 2**30,), "U8")
    assert [opened.bytes_read for opened in OPENED] == [header_bytes]


# --- pickles are known before anything unpickles them ---------------------------------------------------------


def test_a_pickle_renamed_safetensors_is_named_as_one_and_never_unpickled(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.safetensors")
    (tmp_path / "plain.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    for name in ("zip.safetensors", "plain.safetensors"):
        with pytest.raises(ModelFileError, match="it is a PyTorch pickle or zip archive"):
            read_safetensors_header(tmp_path / name)


def test_a_safetensors_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    # A 640-byte header is 0x280: the file opens with 0x80 0x02, pickle protocol 2's first two bytes.
    header = json.dumps({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "640.safetensors"
    path.write_bytes((640).to_bytes(8, "little") + header.ljust(640) + b"\0" * 4)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_safetensors_header(path) == ({"a": TensorInfo((2,), "F16")}, {})
