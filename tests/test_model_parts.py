"""One run loads each part of the model once, and fingerprints its VAE once, whichever stages use them."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import copy_examples, small_raw_config, train_in_process


@pytest.fixture
def loads(monkeypatch) -> Counter:
    """Counts every read of a model part from disk, by part, and every VAE fingerprint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import lora_trainer.cache.latents as latents
    import lora_trainer.cache.text as text

    counts: Counter = Counter()

    def counting(owner, method: str, name=None):
        real = getattr(owner, method)

        def wrapper(*args, **kwargs):
            counts[name or kwargs.get("subfolder") or owner.__name__] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, method, wrapper)

    counting(AutoencoderKL, "from_pretrained", "vae")
    counting(UNet2DConditionModel, "from_pretrained", "unet")
    counting(CLIPTextModel, "from_pretrained", "text_encoder")
    counting(CLIPTextModelWithProjection, "from_pretrained", "text_encoder_2")
    counting(CLIPTokenizer, "from_pretrained")
    counting(DDPMScheduler, "load_config", "noise scheduler")
    counting(latents, "vae_fingerprint", "vae fingerprint")
    counting(text, "text_encoders_fingerprint", "text fingerprint")
    return counts


def quickstart_like(tmp_path, **data) -> dict:
    """The quickstart's kinds of work on the tiny model: caches, samples before and during training, validation."""
    raw = small_raw_config(tmp_path)
    raw["data"].update(data)
    raw["training"].update(max_steps=None, epochs=1, batch_size=4)
    raw["sample"] = {"prompts": ["a red circle"], "steps": 1}
    return raw


EVERY_PART_ONCE = {
    "vae": 1, "unet": 1, "text_encoder": 1, "text_encoder_2": 1, "tokenizer": 1, "tokenizer_2": 1, "noise scheduler": 1,
}


def test_a_run_with_latent_and_validation_caches_loads_each_part_once(tiny_model_path, tmp_path, loads):
    held_out = tmp_path / "held_out"
    copy_examples(held_out, 2)
    raw = quickstart_like(tmp_path)
    raw["validation"] = {"path": str(held_out), "timesteps": [500]}
    train_in_process(raw)
    assert loads == {**EVERY_PART_ONCE, "vae fingerprint": 1}


def test_a_run_that_encodes_every_step_loads_each_part_once(tiny_model_path, tmp_path, loads):
    raw = quickstart_like(tmp_path, cache_latents=False)
    raw["datasets"][0]["random_crop"] = True
    raw["network"].update(train_text_encoder_1=False, train_text_encoder_2=False)  # with the text cache
    raw["validation"] = {"fraction": 0.25, "timesteps": [500]}  # held-out images need cached latents
    run, _ = train_in_process(raw)
    assert run.vae is run.parts.vae and run.evaluator.drawer.vae is run.parts.vae
    assert loads == {**EVERY_PART_ONCE, "vae fingerprint": 1, "text fingerprint": 1}
