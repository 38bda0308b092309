"""Mixed precision and optimizers: their logic on CPU (their speed and numerics at scale are GPU benchmarks)."""

from __future__ import annotations

import pytest
import torch
from conftest import train_in_process

from lora_trainer.adapters.lora import UNET_TARGETS, lora_parameters
from lora_trainer.adapters.attach import attach_lora
from lora_trainer.config.model import ModelConfig
from lora_trainer.config.training import TrainingConfig
from lora_trainer.errors import ConfigError
from lora_trainer.export.lora_file import read_lora_file
from lora_trainer.fit.optim import make_optimizer
from lora_trainer.fit.schedules import make_lr_scheduler
from lora_trainer.model.parts import load_sdxl
from lora_trainer.model.precision import resolve_mixed_precision


@pytest.mark.parametrize(
    "cuda, bf16, expected", [(False, False, "no"), (True, True, "bf16"), (True, False, "fp16")]
)
def test_auto_picks_bf16_fp16_or_fp32(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_mixed_precision("auto") == expected


def test_fp16_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="training.mixed_precision: fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16")


def test_adapters_stay_fp32_on_half_precision_base_weights(tiny_model_path):
    unet = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).unet.to(torch.bfloat16)
    attach_lora(unet, UNET_TARGETS, rank=4, alpha=4)
    adapters = lora_parameters(unet)
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    adapter_ids = {id(p) for p in adapters}
    others = [p for p in unet.parameters() if id(p) not in adapter_ids]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in others)


def test_a_bf16_run_trains_fp32_adapters_and_saves_the_requested_dtype(raw_config):
    raw_config["training"].update(mixed_precision="bf16", max_steps=2)
    raw_config["output"]["save_dtype"] = "bf16"
    run, path = train_in_process(raw_config)
    unet = run.accelerator.unwrap_model(run.trained["unet"])
    assert next(unet.conv_in.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(unet))
    lora = read_lora_file(path)
    assert lora.metadata["ss_mixed_precision"] == "bf16"
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("lora_up.weight"))
        assert handle.get_tensor(key).dtype == torch.bfloat16
        assert handle.get_tensor(key.replace("lora_up.weight", "alpha")).dtype == torch.float32


def test_adamw8bit_is_bitsandbytes_and_steps(raw_config):
    import bitsandbytes

    parameter = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = make_optimizer([{"params": [parameter], "lr": 1e-2}], TrainingConfig(optimizer="adamw8bit"))
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    before = parameter.detach().clone()
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert not torch.equal(parameter, before)
    state = optimizer.state[parameter]
    assert state["state1"].dtype == torch.uint8  # 8-bit moments, the memory saving


def test_training_with_adamw8bit_end_to_end(raw_config):
    raw_config["training"].update(optimizer="AdamW8bit", max_steps=2)
    run, path = train_in_process(raw_config)
    # kohya's form: the class and its arguments, which civitai shows.
    assert read_lora_file(path).metadata["ss_optimizer"] == "bitsandbytes.optim.AdamW8bit(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.01)"


def test_text_encoders_get_their_own_learning_rate(raw_config):
    raw_config["network"].update(text_encoder_learning_rate=5e-5, text_encoder_2_learning_rate=2e-5)
    raw_config["training"].update(learning_rate=1e-3, max_steps=1)
    run, _ = train_in_process(raw_config)
    rates = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    assert rates == {"unet": 1e-3, "text_encoder_1": 5e-5, "text_encoder_2": 2e-5}


def test_warmup_ramps_the_learning_rate():
    parameter = torch.nn.Parameter(torch.zeros(1))
    config = TrainingConfig(learning_rate=1.0, lr_scheduler="constant_with_warmup", lr_warmup_steps=4)
    optimizer = make_optimizer([{"params": [parameter]}], config)
    scheduler = make_lr_scheduler(optimizer, config, total_steps=10)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_path):
    from lora_trainer.adapters.lora import TEXT_ENCODER_TARGETS, lora_layers
    from lora_trainer.fit.setup import enable_gradient_checkpointing
    from lora_trainer.fit.step import training_step
    from lora_trainer.model.conditioning import live_caption_encoder

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
        text, unet = model.text, model.unet
        attach_lora(unet, UNET_TARGETS, 4, 4)
        attach_lora(text.text_encoder_2, TEXT_ENCODER_TARGETS, 4, 4)
        for layer in [*lora_layers(unet).values(), *lora_layers(text.text_encoder_2).values()]:
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        parts = {"unet": unet, "text_encoder_1": text.text_encoder_1, "text_encoder_2": text.text_encoder_2}
        if checkpointing:
            enable_gradient_checkpointing(parts)
        for part in parts.values():
            part.train()
        encode = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, torch.device("cpu"))
        generator = torch.Generator().manual_seed(3)
        batch = {"latents": torch.randn(2, 4, 8, 8, generator=generator), "captions": ["a", "b c"], "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        loss = training_step(unet, encode, model.noise_scheduler, batch, torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([5, 500]))
        loss.backward()
        return [p.grad.clone() for p in lora_parameters(unet) + lora_parameters(text.text_encoder_2)]

    plain, checkpointed = gradients(False), gradients(True)
    assert all(g.abs().sum() > 0 for g in plain[:4])
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
