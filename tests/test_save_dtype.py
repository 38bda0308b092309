"""Saving a LoRA in fp16/bf16 falls back to fp32 when the cast would turn finite weights into inf."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_trainer.export.lora_file import cast_tensors, to_kohya_tensors


def test_weights_that_fit_are_cast_as_asked(caplog):
    tensors = {"a": torch.randn(4, 3), "b": torch.full((2, 2), 60000.0)}
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        cast = cast_tensors(tensors, torch.float16)
    assert all(tensor.dtype == torch.float16 for tensor in cast.values())
    assert torch.equal(cast["a"], tensors["a"].half())
    assert not caplog.records


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_an_overflow_saves_everything_in_fp32_with_one_warning(caplog, dtype, name):
    huge = 1e5 if dtype == torch.float16 else 3.4e38
    tensors = {"a": torch.randn(4, 3), "b": torch.tensor([[huge, 1.0]]), "c": torch.tensor([-huge]), "d": torch.ones(2)}
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        cast = cast_tensors(tensors, dtype)
    assert all(tensor.dtype == torch.float32 for tensor in cast.values())
    assert all(torch.equal(cast[key], tensors[key]) for key in tensors)
    assert [record.getMessage() for record in caplog.records] == [
        f"2 of 4 tensors overflow {name}; saving this LoRA in fp32 instead (output.save_dtype: {name})"
    ]


def test_weights_that_are_not_finite_already_are_saved_as_asked(caplog):
    tensors = {"a": torch.tensor([float("inf"), 1e5]), "b": torch.tensor([float("nan")]), "c": torch.ones(2)}
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        cast = cast_tensors(tensors, torch.float16)
    assert all(tensor.dtype == torch.float16 for tensor in cast.values())
    assert not caplog.records


def test_fp32_is_never_touched(caplog):
    tensors = {"a": torch.tensor([3e38], dtype=torch.float64)}
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        cast = cast_tensors(tensors, torch.float32)
    assert cast["a"].dtype == torch.float32 and not caplog.records


def test_to_kohya_tensors_falls_back_to_fp32_on_overflow(monkeypatch, caplog):
    from lora_trainer.adapters.weights import lora_weights

    monkeypatch.setattr("lora_trainer.export.lora_file.kohya_module_name", lambda part, path, model: f"lora_unet_{path}")
    weights = {
        "small": lora_weights(down=torch.randn(2, 8), up=torch.randn(8, 2), alpha=0.3),
        "big": lora_weights(down=torch.randn(2, 8), up=torch.full((8, 2), 7e4), alpha=2.0),
    }
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        tensors = to_kohya_tensors({"unet": (torch.nn.Linear(1, 1), weights)}, torch.float16)
    assert list(tensors) == [
        f"lora_unet_{name}{suffix}" for name in weights for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")
    ]
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in tensors.values())
    assert tensors["lora_unet_small.alpha"].item() == pytest.approx(0.3)
    assert [record.getMessage() for record in caplog.records] == [
        "1 of 4 tensors overflow fp16; saving this LoRA in fp32 instead (output.save_dtype: fp16)"
    ]

    weights["big"] = lora_weights(down=torch.randn(2, 8), up=torch.full((8, 2), 6e4), alpha=2.0)
    tensors = to_kohya_tensors({"unet": (torch.nn.Linear(1, 1), weights)}, torch.float16)
    assert {tensor.dtype for key, tensor in tensors.items() if not key.endswith(".alpha")} == {torch.float16}
    assert all(tensors[key].dtype == torch.float32 for key in tensors if key.endswith(".alpha"))
