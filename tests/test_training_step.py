"""The loss of one training step equals an independent computation written from SDXL's formulas.

The reference below does not call our conditioning, noising or loss code, nor diffusers'
scheduler: it reads the penultimate layer outputs with forward hooks, builds the pooled embedding
from the final LayerNorm at the first end token and the projection, computes the noise schedule
from the betas, and the MSE by hand.
"""

from __future__ import annotations

import pytest
import torch

from lora_trainer.adapters.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, lora_layers
from lora_trainer.adapters.attach import attach_lora
from lora_trainer.config.model import ModelConfig
from lora_trainer.fit.objective import draw_noise_and_timesteps
from lora_trainer.fit.step import training_step
from lora_trainer.model.conditioning import live_caption_encoder, time_ids
from lora_trainer.model.parts import load_sdxl

CAPTIONS = ["lts_shapes, a red circle, white background", "zqxj wearing a hat"]


@pytest.fixture(scope="module")
def parts(tiny_model_path):
    torch.manual_seed(0)
    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    text, unet = parts.text, parts.unet
    attach_lora(unet, UNET_TARGETS, rank=4, alpha=2.0)
    attach_lora(text.text_encoder_1, TEXT_ENCODER_TARGETS, rank=4, alpha=2.0)
    attach_lora(text.text_encoder_2, TEXT_ENCODER_TARGETS, rank=4, alpha=2.0)
    with torch.no_grad():  # non-zero up weights, so the adapters change every output
        for model_part in (unet, text.text_encoder_1, text.text_encoder_2):
            for layer in lora_layers(model_part).values():
                layer.lora_B["default"].weight.normal_(std=0.05)
        # A LayerNorm at its initial values is idempotent, which would hide pooling from the wrong layer.
        final_norm = text.text_encoder_2.text_model.final_layer_norm
        final_norm.weight.normal_(1.0, 0.3)
        final_norm.bias.normal_(std=0.3)
    return text, unet


def _penultimate_by_hook(encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate and the last encoder layer's outputs (neither through the final LayerNorm), by hooks."""
    layers = encoder.text_model.encoder.layers if hasattr(encoder, "text_model") else encoder.encoder.layers
    captured = {}

    def keeper(name):
        return lambda _m, _i, output: captured.update({name: output[0] if isinstance(output, tuple) else output})

    handles = [layers[len(layers) - 2].register_forward_hook(keeper("penultimate")), layers[-1].register_forward_hook(keeper("last"))]
    try:
        encoder(ids, output_hidden_states=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured["penultimate"], captured["last"]


def _reference_loss(text, unet, latents, noise, timesteps, batch_time_ids, prediction_type):
    tokens_1 = text.tokenizer_1(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    tokens_2 = text.tokenizer_2(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden_1, _ = _penultimate_by_hook(text.text_encoder_1, tokens_1)
    hidden_2, last_2 = _penultimate_by_hook(text.text_encoder_2, tokens_2)
    # Pooled: bigG's final-LayerNormed last state at the first end token, through the projection.
    encoder_2 = text.text_encoder_2
    eos_id = text.tokenizer_2.eos_token_id  # <|endoftext|>; the config's eos_token_id is SDXL's legacy 2
    first_eos = (tokens_2 == eos_id).int().argmax(dim=1)
    final = encoder_2.text_model.final_layer_norm(last_2)
    pooled = encoder_2.text_projection(final[torch.arange(len(CAPTIONS)), first_eos])
    context = torch.cat([hidden_1, hidden_2], dim=-1)

    # scaled_linear betas 0.00085..0.012 over 1000 steps (SDXL's schedule).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)[timesteps].float().view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    prediction = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": batch_time_ids}).sample
    return ((prediction - target) ** 2).mean(dim=(1, 2, 3)), context, pooled


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("loss_weights", [None, [1.0, 0.25]])
def test_training_step_loss_matches_the_sdxl_formulas(parts, prediction_type, loss_weights):
    text, unet = parts
    scheduler = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl", prediction_type=prediction_type)).noise_scheduler
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([17, 901])
    batch_time_ids = torch.stack([time_ids((96, 80), (8, 0), (64, 64)), time_ids((64, 128), (0, 32), (64, 64))])
    batch = {"latents": latents, "captions": CAPTIONS, "time_ids": batch_time_ids}
    if loss_weights is not None:
        batch["loss_weights"] = torch.tensor(loss_weights)
    encode = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, torch.device("cpu"))

    with torch.no_grad():
        ours = training_step(unet, encode, scheduler, batch, noise, timesteps)
        per_sample, context, pooled = _reference_loss(text, unet, latents, noise, timesteps, batch_time_ids, prediction_type)
        # Weighted as kohya weighs regularization images: each sample's loss times its weight, averaged.
        weights = torch.tensor(loss_weights or [1.0, 1.0])
        reference = (per_sample * weights).sum() / len(CAPTIONS)
        our_context, our_pooled = encode(CAPTIONS)

    # fp32 rounding only: the two paths run the same layers through different kernels.
    torch.testing.assert_close(our_context, context, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_pooled, pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert ours.item() > 0


def test_time_ids_order_is_original_crop_target():
    assert time_ids((1200, 900), (10, 20), (1024, 1024)).tolist() == [1200, 900, 10, 20, 1024, 1024]


def test_noise_and_timesteps_come_from_the_models_schedule():
    latents = torch.zeros(512, 4, 2, 2)
    noise, timesteps = draw_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(0))
    assert noise.shape == latents.shape and abs(noise.std().item() - 1) < 0.05
    assert timesteps.dtype == torch.int64
    assert 0 <= timesteps.min() and timesteps.max() < 1000
    assert timesteps.unique().numel() > 300  # spread over the whole range, not a constant


def test_tokenizers_pad_like_sdxl(parts):
    text, _ = parts
    ids_1 = text.tokenizer_1(["a cat"], padding="max_length", max_length=77).input_ids[0]
    ids_2 = text.tokenizer_2(["a cat"], padding="max_length", max_length=77).input_ids[0]
    end = text.tokenizer_1.eos_token_id
    assert ids_1[-1] == end  # the first tokenizer pads with the end token
    assert ids_2[-1] == text.tokenizer_2.convert_tokens_to_ids("!")  # the second pads with "!"
    assert ids_2.count(end) == 1
