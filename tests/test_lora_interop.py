"""A file we train loads unchanged in diffusers (and so in the UIs that read the same format).

Points 1-5 of "How we prove it loads" in docs/lora-format.md, on the tiny model whose UNet has SDXL's
three-level block layout.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict

import pytest
import torch
from conftest import small_raw_config, train_in_process
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from lora_trainer.config.model import ModelConfig
from lora_trainer.export.kohya_names import PART_PREFIXES, kohya_names
from lora_trainer.export.lora_file import read_lora_file

DIFFUSERS_COMPONENT = {"unet": "unet", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
# Every key of a kohya SDXL LoRA, as docs/lora-format.md states it.
KEY_PATTERN = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    raw = small_raw_config(tmp_path_factory.mktemp("interop"))
    raw["network"].update(rank=4, alpha=3)  # alpha != rank, so a file that drops alpha fails
    raw["training"].update(max_steps=8, learning_rate=1e-2)
    raw["output"]["name"] = "interop"
    run, path = train_in_process(raw)
    models = {part: run.accelerator.unwrap_model(model).eval() for part, model in run.trained.items()}
    return path, models


@pytest.fixture
def pipeline(tiny_model_path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model_path)


def _modules_by_prefix(path) -> dict[str, set[str]]:
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
    modules = defaultdict(set)
    for key in keys:
        name = key.rsplit(".lora_", 1)[0] if ".lora_" in key else key.rsplit(".", 1)[0]
        modules[name.split("_", 2)[1]].add(name)
    return modules


def test_1_keys_are_kohya_format_whole_and_ldm_only(trained):
    path, _ = trained
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    assert all(KEY_PATTERN.match(key) for key in keys), [key for key in keys if not KEY_PATTERN.match(key)][:3]
    names = {key.split(".")[0] for key in keys}
    for name in names:
        down, up, alpha = (tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"], tensors[f"{name}.alpha"])
        assert down.shape[0] == up.shape[1] == 4
        assert alpha.ndim == 0 and alpha.item() == 3.0
    unet_names = [name for name in names if name.startswith("lora_unet_")]
    assert unet_names and all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in unet_names)
    assert not any(diffusers_word in name for name in names for diffusers_word in ("down_blocks", "up_blocks", "mid_block"))
    assert all(name.startswith(("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_", "lora_unet_")) for name in names)


def test_1_metadata_has_what_uis_need(trained):
    path, _ = trained
    metadata = read_lora_file(path).metadata
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "3.0")
    assert metadata["ss_network_args"] == "{}"
    assert metadata["ss_v2"] == "False"
    assert metadata["ss_output_name"] == "interop"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert re.match(r"\d{4}-\d\d-\d\dT", metadata["modelspec.date"])
    assert "lora_adapter_metadata" not in metadata
    assert all(isinstance(value, str) for value in metadata.values())
    # sshs_model_hash as kohya computes it: SHA-256 of everything after the 8-byte length and the header.
    import hashlib

    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length :]).hexdigest()


def test_2_lora_state_dict_keeps_every_module(trained, pipeline):
    path, _ = trained
    state_dict, alphas = pipeline.lora_state_dict(str(path), unet_config=pipeline.unet.config)
    module_count = sum(len(names) for names in _modules_by_prefix(path).values())
    assert len(state_dict) == 2 * module_count
    assert len(alphas) == module_count
    assert set(alphas.values()) == {3.0}


def test_3_load_lora_weights_consumes_every_key(trained, pipeline):
    path, _ = trained
    messages = _load_capturing_warnings(pipeline, path)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    per_prefix = _modules_by_prefix(path)
    for part, prefix in PART_PREFIXES.items():
        component = getattr(pipeline, DIFFUSERS_COMPONENT[part])
        layers = sum(isinstance(module, BaseTunerLayer) for module in component.modules())
        assert layers == len(per_prefix[prefix.split("_")[1]]) > 0, part


def test_3_a_bad_key_would_be_caught(trained, pipeline, tmp_path):
    """The warning capture above does see diffusers' complaints (else test 3 could not fail)."""
    from safetensors.torch import load_file, save_file

    path, _ = trained
    tensors = load_file(path)
    bogus = "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q"  # no such block in the tiny UNet
    tensors.update({f"{bogus}.lora_down.weight": torch.zeros(4, 32), f"{bogus}.lora_up.weight": torch.zeros(32, 4), f"{bogus}.alpha": torch.tensor(3.0)})
    save_file(tensors, tmp_path / "bogus.safetensors")
    messages = _load_capturing_warnings(pipeline, tmp_path / "bogus.safetensors")
    assert any("unexpected" in message.lower() for message in messages)


def test_4_fused_weights_and_outputs_equal_the_trained_adapters(trained, pipeline, tiny_model_path):
    path, models = trained
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_model_path)
    _load_capturing_warnings(pipeline, path)
    inputs = _probe_inputs()
    loaded_outputs = _outputs(pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2, inputs)
    trained_outputs = _outputs(models["unet"], models["text_encoder_1"], models["text_encoder_2"], inputs)
    base_outputs = _outputs(base.unet, base.text_encoder, base.text_encoder_2, inputs)
    for name in trained_outputs:
        torch.testing.assert_close(loaded_outputs[name], trained_outputs[name], rtol=1e-4, atol=1e-5)
        assert (trained_outputs[name] - base_outputs[name]).abs().max() > 1e-3, f"training did not move {name}"

    pipeline.fuse_lora()
    lora = read_lora_file(path)
    checked = 0
    for part, component in DIFFUSERS_COMPONENT.items():
        fused, original = getattr(pipeline, component), getattr(base, component)
        for kohya_name, module_path in kohya_names(part, original).items():
            if kohya_name not in lora.weights:
                continue
            weights = lora.weights[kohya_name]
            expected = original.get_submodule(module_path).weight + weights.alpha / weights.rank * (weights.up @ weights.down)
            torch.testing.assert_close(fused.get_submodule(module_path).get_base_layer().weight, expected, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == len(lora.weights)
    fused_outputs = _outputs(pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2, inputs)
    for name in trained_outputs:
        torch.testing.assert_close(fused_outputs[name], trained_outputs[name], rtol=1e-4, atol=1e-5)


def test_5_our_loader_reproduces_the_trained_adapters(trained):
    """`sample` loads our file back into live adapters through the reverse mapping; the result matches training."""
    from lora_trainer.export.load import load_loras_into
    from lora_trainer.model.parts import load_sdxl

    path, models = trained
    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    load_loras_into(parts.lora_targets(), [(read_lora_file(path), 1.0, str(path))])
    unet, text = parts.unet, parts.text
    inputs = _probe_inputs()
    ours = _outputs(unet, text.text_encoder_1, text.text_encoder_2, inputs)
    trained_outputs = _outputs(models["unet"], models["text_encoder_1"], models["text_encoder_2"], inputs)
    for name in trained_outputs:
        torch.testing.assert_close(ours[name], trained_outputs[name], rtol=1e-5, atol=1e-6)


def _load_capturing_warnings(pipeline, path) -> list[str]:
    from diffusers.utils import logging as diffusers_logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    diffusers_logging.set_verbosity_warning()
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipeline.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return messages + [str(warning.message) for warning in caught]


def _probe_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=generator),
        "timesteps": torch.tensor([10, 700]),
        "context": torch.randn(2, 77, 96, generator=generator),
        "pooled": torch.randn(2, 64, generator=generator),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [80, 64, 8, 0, 64, 64]]),
        "ids": torch.randint(0, 512, (2, 77), generator=generator),
    }


@torch.no_grad()
def _outputs(unet, text_encoder_1, text_encoder_2, inputs) -> dict[str, torch.Tensor]:
    for model in (unet, text_encoder_1, text_encoder_2):
        model.eval()
    unet_out = unet(
        inputs["latents"], inputs["timesteps"], encoder_hidden_states=inputs["context"],
        added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]},
    ).sample
    out_1 = text_encoder_1(inputs["ids"], output_hidden_states=True)
    out_2 = text_encoder_2(inputs["ids"], output_hidden_states=True)
    return {
        "unet": unet_out,
        "text_encoder_1.penultimate": out_1.hidden_states[-2],
        "text_encoder_2.penultimate": out_2.hidden_states[-2],
        "text_encoder_2.pooled": out_2.text_embeds,
    }
