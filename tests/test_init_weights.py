"""`network.init_weights` (kohya's `--network_weights`): a new run starts its adapters from a LoRA file's weights."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import small_raw_config
from safetensors.torch import load_file, save_file

from lora_trainer.adapters.lora import lora_layers
from lora_trainer.adapters.wiring import attach_adapters
from lora_trainer.config.load import parse_config
from lora_trainer.config.model import ModelConfig
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.export.init_weights import load_initial_weights
from lora_trainer.export.kohya_names import kohya_module_name
from lora_trainer.export.lora_file import read_lora_file
from lora_trainer.model.parts import load_sdxl


def _network(tmp_path, **changes):
    raw = small_raw_config(tmp_path)
    raw["network"].update(changes)
    return parse_config(raw).network


def _adapted(tmp_path, **changes) -> dict[str, torch.nn.Module]:
    return attach_adapters(load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).lora_targets(), _network(tmp_path, **changes))


def _effective(layer) -> torch.Tensor:
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return up @ down * (layer.lora_alpha["default"] / layer.r["default"])


def _by_kohya_name(trained):
    return {
        kohya_module_name(part, path, model): layer for part, model in trained.items() for path, layer in lora_layers(model).items()
    }


def test_adapters_start_from_the_file(small_lora_file, tmp_path, caplog):
    trained = _adapted(tmp_path)
    frozen_before = {name for name, layer in _by_kohya_name(trained).items() if not layer.lora_A["default"].weight.requires_grad}
    with caplog.at_level(logging.INFO, logger="lora_trainer.export.init_weights"):
        load_initial_weights(trained, small_lora_file)
    lora = read_lora_file(small_lora_file)
    layers = _by_kohya_name(trained)
    assert set(layers) == set(lora.weights), "the default run adapts exactly the modules the file has"
    assert {name[: name.index("_", 5)] for name in lora.weights} == {"lora_unet", "lora_te1", "lora_te2"}
    for name, weights in lora.weights.items():
        layer = layers[name]
        expected = weights.up @ weights.down * (weights.alpha / weights.rank)
        torch.testing.assert_close(_effective(layer), expected, rtol=0, atol=0)
        for parameter in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            assert parameter.dtype == torch.float32
    assert any(bool(weights.up.abs().sum()) for weights in lora.weights.values()), "the file is not all zeros"
    frozen_after = {name for name, layer in layers.items() if not layer.lora_A["default"].weight.requires_grad}
    assert frozen_after == frozen_before  # CLIP-L's unused last layer stays frozen; the rest still train
    messages = [record.getMessage() for record in caplog.records if record.name == "lora_trainer.export.init_weights"]
    assert messages == [f"started the adapters from {small_lora_file}: {len(lora.weights)} modules"]


def test_none_changes_nothing(tmp_path):
    trained = _adapted(tmp_path)
    before = {name: _effective(layer).clone() for name, layer in _by_kohya_name(trained).items()}
    load_initial_weights(trained, None)
    assert all(torch.equal(_effective(layer), before[name]) for name, layer in _by_kohya_name(trained).items())


def test_rank_mismatch_names_the_module_and_the_setting(small_lora_file, tmp_path):
    with pytest.raises(UserError) as caught:
        load_initial_weights(_adapted(tmp_path, rank=8), small_lora_file)
    message = str(caught.value)
    assert message.startswith(f"network.init_weights: {small_lora_file} has rank 4 at lora_")
    assert message.endswith("the config trains rank 8; set network.rank: 4") and "\n" not in message


def test_alpha_mismatch_names_the_setting(small_lora_file, tmp_path):
    with pytest.raises(UserError, match=r"has alpha 2 at lora_\w+, the config trains alpha 4; set network\.alpha: 2$"):
        load_initial_weights(_adapted(tmp_path, alpha=4), small_lora_file)


def test_weights_for_a_part_that_does_not_train(small_lora_file, tmp_path):
    trained = _adapted(tmp_path, train_text_encoder_2=False)
    with pytest.raises(UserError, match=r"has text_encoder_2 weights .* set network\.train_text_encoder_2: true$"):
        load_initial_weights(trained, small_lora_file)


def test_modules_the_model_lacks(small_lora_file, tmp_path):
    tensors = load_file(small_lora_file)
    name = next(key for key in tensors if key.startswith("lora_unet_")).split(".")[0]
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors[f"lora_unet_nowhere_block{suffix}"] = tensors[f"{name}{suffix}"].clone()
    path = tmp_path / "extra.safetensors"
    save_file(tensors, path)
    with pytest.raises(UserError, match=r"module lora_unet_nowhere_block .* which this model does not have"):
        load_initial_weights(_adapted(tmp_path), path)


def test_modules_the_file_lacks_start_fresh_with_one_warning(small_lora_file, tmp_path, caplog):
    tensors = load_file(small_lora_file)
    dropped = sorted({key.split(".")[0] for key in tensors if key.startswith("lora_unet_")})[:2]
    path = tmp_path / "partial.safetensors"
    save_file({key: value for key, value in tensors.items() if key.split(".")[0] not in dropped}, path)
    trained = _adapted(tmp_path)
    with caplog.at_level(logging.INFO, logger="lora_trainer.export.init_weights"):
        load_initial_weights(trained, path)
    layers = _by_kohya_name(trained)
    assert all(not layers[name].lora_B["default"].weight.any() for name in dropped), "fresh: up is zero"
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == [f"network.init_weights: {path} has no weights for 2 adapted modules, e.g. {dropped[0]}; they start fresh"]


# The config field: checked when the config is read, before any model is loaded.


def _config_error(tmp_path, value) -> str:
    raw = small_raw_config(tmp_path)
    raw["network"]["init_weights"] = str(value)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return str(caught.value)


def test_config_missing_file(tmp_path):
    message = _config_error(tmp_path, tmp_path / "nope.safetensors")
    assert message == f"config: network.init_weights: file not found: {tmp_path / 'nope.safetensors'}"


def test_config_refuses_a_pickle(tmp_path):
    (tmp_path / "old.ckpt").write_bytes(b"not read")
    message = _config_error(tmp_path, tmp_path / "old.ckpt")
    assert message.startswith("config: network.init_weights: must be a .safetensors LoRA file") and "\n" not in message


def test_config_resolves_the_path(small_lora_file, tmp_path, monkeypatch):
    monkeypatch.chdir(small_lora_file.parent)
    raw = small_raw_config(tmp_path)
    raw["network"]["init_weights"] = small_lora_file.name
    assert parse_config(raw).network.init_weights == small_lora_file.resolve()
    assert parse_config(small_raw_config(tmp_path)).network.init_weights is None


def test_a_training_run_starts_from_the_file(small_lora_file, tmp_path):
    """Through `train`'s own setup: with a vanishing learning rate, the run ends where the file began."""
    from conftest import train_in_process

    raw = small_raw_config(tmp_path)
    raw["network"]["init_weights"] = str(small_lora_file)
    raw["training"].update(max_steps=1, learning_rate=1e-12)
    _, path = train_in_process(raw)
    start, end = load_file(small_lora_file), load_file(path)
    assert start.keys() == end.keys()
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-6)


def test_a_locon_file_for_a_plain_lora_run_says_to_train_locon(tmp_path):
    from lora_trainer.adapters.wiring import attach_adapters
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.config.network import NetworkConfig
    from lora_trainer.export.init_weights import _unknown_module_message
    from lora_trainer.model.parts import load_sdxl

    unet = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).unet
    attach_adapters({"unet": unet}, NetworkConfig(train_text_encoder_1=False, train_text_encoder_2=False))
    message = _unknown_module_message(tmp_path / "x.safetensors", "unet", unet, ["lora_unet_input_blocks_1_0_in_layers_2"])
    assert "which this run does not adapt" in message and "network.type: locon" in message
