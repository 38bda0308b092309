"""The fast paths change no numbers: compiled transformer blocks, channels-last weights, PyTorch's SDPA attention.

The compile test uses torch's `aot_eager` backend, which traces forward and backward graphs as inductor does but
runs them with eager kernels, so it costs seconds on a CPU; with inductor it runs by hand (LORA_TRAIN_INDUCTOR=1,
minutes on a CPU), and benchmarks/gpu_suite.sh measures it on a GPU.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from conftest import copy_examples, train_in_process


def _losses(raw: dict, folder, **training) -> list[float]:
    raw = copy.deepcopy(raw)
    raw["training"].update(training)
    raw["output"]["dir"] = str(folder)
    run, _ = train_in_process(raw)
    return run.history.train_losses


@pytest.fixture
def two_shapes(tmp_path, raw_config):
    """Images of two aspect ratios, so training meets two bucket shapes."""
    from PIL import Image

    folder = tmp_path / "two_shapes"
    images = copy_examples(folder, 4)
    for path in images[:2]:
        Image.open(path).resize((256, 128)).save(path)  # a 192 x 64 bucket beside the square ones
    raw_config["datasets"][0]["path"] = str(folder)
    raw_config["data"]["resolution"] = 128
    raw_config["training"]["max_steps"] = 4
    return raw_config


INDUCTOR = pytest.param(
    "inductor", marks=[pytest.mark.inductor, pytest.mark.skipif(os.environ.get("LORA_TRAIN_INDUCTOR") != "1", reason="LORA_TRAIN_INDUCTOR=1")]
)


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_blocks_and_channels_last_train_as_eager_does_across_bucket_shapes(two_shapes, tmp_path, caplog, backend):
    from lora_trainer.fit.compile import compiled_graphs

    caplog.set_level(logging.INFO, logger="lora_trainer.fit.loop")
    reference = _losses(two_shapes, tmp_path / "eager")
    before = compiled_graphs()
    compiled = _losses(two_shapes, tmp_path / "compiled", compile=True, compile_backend=backend)
    graphs = compiled_graphs() - before
    channels_last = _losses(two_shapes, tmp_path / "channels_last", channels_last=True)

    assert len(reference) == 4
    assert compiled == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert channels_last == pytest.approx(reference, rel=1e-5, abs=1e-6)
    # Both shapes ran through compiled blocks, in a few graphs: not one per block, not past the recompile limit.
    assert 2 <= graphs <= 8, graphs
    assert f"torch.compile: {graphs} graphs compiled during training" in caplog.text


def test_the_unet_and_text_encoders_attend_through_pytorch_sdpa(tiny_model_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.parts import load_sdxl

    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    assert {type(processor) for processor in parts.unet.attn_processors.values()} == {AttnProcessor2_0}
    for encoder in (parts.text.text_encoder_1, parts.text.text_encoder_2):
        assert encoder.config._attn_implementation == "sdpa"


def test_an_unknown_compile_backend_is_one_line_naming_the_field():
    from diffusers.models.attention import BasicTransformerBlock

    from lora_trainer.errors import UserError
    from lora_trainer.fit.compile import compile_transformer_blocks

    model = torch.nn.Sequential(BasicTransformerBlock(8, 2, 4))
    with pytest.raises(UserError, match=r"^training.compile_backend: 'inductr' is not a torch.compile backend; use one of .*inductor"):
        compile_transformer_blocks(model, "inductr")
