"""Builtin models: tiny-sdxl, an ordinary diffusers folder with SDXL's layout (and SDXL's tokenizers:
tests/test_clip_tokenizer.py), and shapes-sdxl, the pretrained example base that ships with the package,
whose byte-level tokenizers (`make_tiny_tokenizers`) cover every character."""

from __future__ import annotations

import json

import pytest
import torch

from lora_trainer.config.model import ModelConfig
from lora_trainer.model.builtin import build_tiny_sdxl, make_tiny_tokenizers
from lora_trainer.model.parts import load_sdxl
from lora_trainer.model.sources import model_location


@pytest.fixture(scope="module")
def tokenizers():
    return make_tiny_tokenizers()


@pytest.mark.parametrize("text", ["zqxjv", "lts_shapes", "Émile über 日本 😀 ÆØÅ", "a/b\\c {x} <y> #1 100%"])
def test_made_up_words_tokenize_to_non_end_ids(tokenizers, text):
    for tokenizer in tokenizers:
        ids = tokenizer(text).input_ids
        end = tokenizer.eos_token_id
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == end
        assert end not in ids[1:-1], "a character fell back to the unknown token (CLIP's end token)"
        assert tokenizer.unk_token_id == end  # as in CLIP, which is why coverage matters
        assert len(ids) > 2


def test_end_token_is_the_highest_id_and_the_second_tokenizer_pads_with_bang(tokenizers):
    first, second = tokenizers
    for tokenizer in tokenizers:
        assert tokenizer.eos_token_id == len(tokenizer) - 1
        assert tokenizer.model_max_length == 77
    assert first.pad_token == "<|endoftext|>"
    assert second.pad_token == "!"
    padded = second("a cat", padding="max_length", max_length=77).input_ids
    # With "!" padding the first end token and the highest id coincide, so pooling is unambiguous.
    assert padded.index(second.eos_token_id) == max(range(77), key=lambda i: padded[i])


def test_builtin_reference_resolves_to_an_ordinary_diffusers_folder(tiny_model_path, lora_train_home):
    from diffusers import StableDiffusionXLPipeline

    assert model_location("builtin:tiny-sdxl") == str(tiny_model_path)
    assert tiny_model_path.is_relative_to(lora_train_home)
    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert not list(tiny_model_path.rglob("*.bin")), "weights are safetensors only"
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_path)
    assert "not SDXL" in (tiny_model_path / "README.md").read_text()
    assert pipeline.vae_scale_factor == 8


def test_unet_has_sdxls_layout(tiny_model_path):
    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    config = parts.unet.config
    assert config.addition_embed_type == "text_time"
    assert list(config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(config.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert config.layers_per_block == 2
    text = parts.text
    widths = text.text_encoder_1.config.hidden_size + text.text_encoder_2.config.hidden_size
    assert config.cross_attention_dim == widths
    assert config.projection_class_embeddings_input_dim == text.text_encoder_2.config.projection_dim + 6 * config.addition_time_embed_dim
    assert type(text.text_encoder_1).__name__ == "CLIPTextModel"
    assert type(text.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_the_build_is_deterministic(tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    build_tiny_sdxl(tmp_path / "again")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        first, second = load_file(tiny_model_path / part), load_file(tmp_path / "again" / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_shipped_shapes_base_is_a_small_fp16_sdxl_folder():
    from lora_trainer.model.builtin import PRETRAINED_FOLDER

    folder = PRETRAINED_FOLDER / "shapes-sdxl"
    assert model_location("builtin:shapes-sdxl") == str(folder)
    weights = list(folder.rglob("*.safetensors"))
    assert {path.parent.name for path in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert not list(folder.rglob("*.bin")), "weights are safetensors only"
    assert sum(path.stat().st_size for path in weights) < 10 * 2**20
    from safetensors.torch import load_file

    assert {tensor.dtype for path in weights for tensor in load_file(path).values()} == {torch.float16}
    unet = load_sdxl(ModelConfig(pretrained="builtin:shapes-sdxl")).unet
    assert unet.config.addition_embed_type == "text_time"
    assert "## How well it draws" in (folder / "README.md").read_text(encoding="utf-8")


def test_the_shipped_tokenizers_give_the_quickstart_trigger_real_tokens():
    text = load_sdxl(ModelConfig(pretrained="builtin:shapes-sdxl")).text
    for tokenizer in (text.tokenizer_1, text.tokenizer_2):
        ids = tokenizer("a zqx circle").input_ids
        assert tokenizer.eos_token_id not in ids[1:-1], "zqx would fall back to the end token"
        assert len(ids) == len("a zqx circle".replace(" ", "")) + 2  # one token per character, plus start and end


def test_a_missing_shipped_base_is_one_line_naming_the_field(monkeypatch, tmp_path):
    from lora_trainer.errors import UserError
    from lora_trainer.model import builtin

    monkeypatch.setattr(builtin, "PRETRAINED_FOLDER", tmp_path)
    with pytest.raises(UserError, match=r"^model.pretrained: builtin:shapes-sdxl is missing from .*reinstall"):
        model_location("builtin:shapes-sdxl")
