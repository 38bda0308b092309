"""Captions past 75 tokens (`data.max_token_length` 150 / 225), encoded by kohya sd-scripts' rule.

The reference here restates that rule on its own: it tokenizes, builds the chunks, runs the encoders
(reading the penultimate layer with a forward hook) and slices the states itself, without our
conditioning code. Cut captions are reported in one warning line and a file.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import copy_examples, run_cli, small_raw_config, write_yaml

from lora_trainer.cache.text import TextEmbeddingCache, cache_caption_embeddings, fill_text_cache
from lora_trainer.config.load import parse_config
from lora_trainer.config.model import ModelConfig
from lora_trainer.model.conditioning import live_caption_encoder, tokenize
from lora_trainer.model.parts import load_sdxl

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
THINGS = ["circle", "square", "triangle", "star", "hat", "cat", "tree", "house"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def text(tiny_model_path):
    return load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).text


def token_count(tokenizer, caption: str) -> int:
    return len(tokenizer(caption).input_ids) - 2  # without the start and end token


def caption_of(text, tokens: int) -> str:
    """A caption of tags, just over `tokens` long with the first tokenizer."""
    tags: list[str] = []
    while token_count(text.tokenizer_1, ", ".join(tags)) < tokens:
        tags.append(f"{COLOURS[len(tags) % 8]} {THINGS[len(tags) // 8 % 8]}")
    return ", ".join(tags)


@pytest.fixture(scope="module")
def long_caption(text) -> str:
    caption = caption_of(text, 120)
    assert 115 <= token_count(text.tokenizer_1, caption) <= 135
    return caption


def encoder(text, max_token_length: int):
    return live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, CPU, max_token_length)


# --- the reference: kohya's rule, restated ---


def kohya_chunks(tokenizer, caption: str, max_token_length: int) -> torch.Tensor:
    """BOS + the next 75 ids + the final id of the padded sequence; for a tokenizer that pads with a token of
    its own, a chunk cut inside the text ends with EOS and an empty chunk starts BOS, EOS."""
    ids = tokenizer(caption, padding="max_length", max_length=max_token_length + 2, truncation=True).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_token_length + 1, 75):
        chunk = [ids[0], *ids[start : start + 75], ids[-1]]
        if pad != eos:
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return torch.tensor(chunks)


def transformer(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)


def penultimate(text_encoder, ids: torch.Tensor):
    layers = transformer(text_encoder).encoder.layers
    seen = {}
    hook = layers[len(layers) - 2].register_forward_hook(lambda _m, _i, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        output = text_encoder(ids)
    finally:
        hook.remove()
    return seen["h"], output


def kohya_slice(states: torch.Tensor) -> torch.Tensor:
    """[chunks, 77, W] -> [1 + 75 chunks + 1, W]: the first BOS state, each chunk's 75 inner, the last final."""
    return torch.cat([states[0, :1], *[states[k, 1:76] for k in range(len(states))], states[-1, 76:]])


@torch.no_grad()
def kohya_encoding(text, caption: str, max_token_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunks_1 = kohya_chunks(text.tokenizer_1, caption, max_token_length)
    chunks_2 = kohya_chunks(text.tokenizer_2, caption, max_token_length)
    states_1, _ = penultimate(text.text_encoder_1, chunks_1)
    states_2, output_2 = penultimate(text.text_encoder_2, chunks_2)
    context = torch.cat([kohya_slice(states_1), kohya_slice(states_2)], dim=-1)
    # pooled: the first chunk's, bigG's final-LayerNormed state at its first EOS, through the projection
    encoder_2 = text.text_encoder_2
    first_eos = int((chunks_2[0] == text.tokenizer_2.eos_token_id).nonzero()[0])
    final = transformer(encoder_2).final_layer_norm(output_2.last_hidden_state[0, first_eos])
    return context, encoder_2.text_projection(final)


# --- encoding ---


def test_a_long_caption_at_225_is_encoded_by_kohyas_rule(text, long_caption):
    chunks_1 = kohya_chunks(text.tokenizer_1, long_caption, 225)
    chunks_2 = kohya_chunks(text.tokenizer_2, long_caption, 225)
    assert torch.equal(tokenize(text.tokenizer_1, [long_caption], 225)[0], chunks_1)
    assert torch.equal(tokenize(text.tokenizer_2, [long_caption], 225)[0], chunks_2)
    bos, eos, pad_2 = text.tokenizer_2.bos_token_id, text.tokenizer_2.eos_token_id, text.tokenizer_2.pad_token_id
    assert chunks_2.shape == (3, 77) and chunks_2[0, -1] == eos  # the first chunk stops inside the caption
    assert chunks_2[2].tolist() == [bos, eos] + [pad_2] * 75  # nothing is left for the third: BOS, EOS, padding
    assert chunks_1[2].tolist() == [bos] + [text.tokenizer_1.eos_token_id] * 76

    with torch.no_grad():
        context, pooled = encoder(text, 225)([long_caption, "a red circle"])
    expected_context, expected_pooled = kohya_encoding(text, long_caption, 225)
    assert context.shape == (2, 227, text.text_encoder_1.config.hidden_size + text.text_encoder_2.config.hidden_size)
    torch.testing.assert_close(context[0], expected_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled[0], expected_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context[1], kohya_encoding(text, "a red circle", 225)[0], rtol=1e-5, atol=1e-5)


def test_changing_the_last_tag_changes_the_context_past_75_tokens_only(text, long_caption):
    other = long_caption.rsplit(",", 1)[0] + ", golden dragon"
    with torch.no_grad():
        long_a, long_b = encoder(text, 225)([long_caption, other])[0]
        short_a, short_b = encoder(text, 75)([long_caption, other])[0]
    assert not torch.allclose(long_a, long_b)
    assert torch.equal(short_a, short_b)  # at 75 the last tag is cut off


@pytest.mark.parametrize("max_token_length", [None, 75])
def test_at_75_the_context_is_the_plain_77_token_encoding(text, long_caption, max_token_length):
    captions = [long_caption, "a red circle", ""]
    plain = [tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
             for tok in (text.tokenizer_1, text.tokenizer_2)]
    with torch.no_grad():
        output_1 = text.text_encoder_1(plain[0], output_hidden_states=True)
        output_2 = text.text_encoder_2(plain[1], output_hidden_states=True)
        encode = (live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, CPU)
                  if max_token_length is None else encoder(text, max_token_length))
        context, pooled = encode(captions)
    assert torch.equal(context, torch.cat([output_1.hidden_states[-2], output_2.hidden_states[-2]], dim=-1))
    assert torch.equal(pooled, output_2.text_embeds)


# --- the text cache ---


def test_the_text_cache_keeps_225_apart_from_75(text, long_caption, tmp_path):
    captions = sorted([long_caption, "a red circle"])  # in the order, and the batch, that the cache encodes them
    long_cache = TextEmbeddingCache(tmp_path, "encoders", torch.float32, 225)
    short_cache = TextEmbeddingCache(tmp_path, "encoders", torch.float32, 75)
    assert long_cache.path(long_caption) != short_cache.path(long_caption)
    with torch.no_grad():
        assert fill_text_cache(captions, long_cache, encoder(text, 225), show_progress=False) == (0, 2)
        assert fill_text_cache(captions, short_cache, encoder(text, 75), show_progress=False) == (0, 2)  # no collision
        assert fill_text_cache(captions, long_cache, encoder(text, 225), show_progress=False) == (2, 0)
        expected = encoder(text, 225)(captions)
    index = captions.index(long_caption)
    context, pooled = long_cache.load(long_caption)
    assert torch.equal(context, expected[0][index]) and torch.equal(pooled, expected[1][index])
    assert context.shape[0] == 227 and short_cache.load(long_caption)[0].shape[0] == 77


def test_the_run_caches_text_at_its_max_token_length(text, long_caption, tmp_path):
    raw = small_raw_config(tmp_path)
    raw["data"]["max_token_length"] = 225
    config = parse_config(raw)
    with torch.no_grad():
        cache, reused, encoded = cache_caption_embeddings(config, [], text, CPU, torch.float32, False, [long_caption])
    assert (cache.max_token_length, reused, encoded) == (225, 0, 1)
    torch.testing.assert_close(cache.load(long_caption)[0], kohya_encoding(text, long_caption, 225)[0], rtol=1e-5, atol=1e-5)


# --- cut captions ---


def setup_and_close(raw: dict):
    from lora_trainer.fit.setup import setup

    run = setup(parse_config(raw))
    run.accelerator.end_training()
    return run


def test_a_caption_past_max_token_length_is_reported_as_cut(text, long_caption, tmp_path, caplog):
    images = copy_examples(tmp_path / "data", 2)
    images[0].with_suffix(".txt").write_text(long_caption, encoding="utf-8")
    raw = small_raw_config(tmp_path)
    raw["datasets"] = [{"path": str(tmp_path / "data"), "caption_prefix": "zqx"}]
    tokens = token_count(text.tokenizer_1, f"zqx {long_caption}")  # as written, the prefix included
    listing = tmp_path / "out" / "test_lora-cut-captions.txt"

    caplog.set_level(logging.INFO, logger="lora_trainer")
    setup_and_close(raw)
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING and "cut" in record.getMessage()]
    assert warning == (
        f"1 caption is longer than data.max_token_length (75 tokens) and cut: at most {tokens - 75} tokens lost, "
        f"{tokens - 75:.1f} on average ({images[0]}); all listed in {listing}; data.max_token_length: 225 keeps up to 225"
    )
    assert listing.read_text(encoding="utf-8").splitlines()[1:] == [f"{images[0]}\t{tokens}\t{tokens - 75}"]

    caplog.clear()
    raw["data"]["max_token_length"] = 225
    run = setup_and_close(raw)
    assert not [record for record in caplog.records if "cut" in record.getMessage()]
    assert not listing.exists()  # the earlier list is out of date
    with torch.no_grad():
        assert run.encode_captions([long_caption])[0].shape[1] == 227
        assert run.evaluator.encode_captions([long_caption])[0].shape[1] == 227


# --- sampling ---


@pytest.fixture(scope="module")
def pipeline(tiny_model_path):
    from lora_trainer.sampling.generate import pipeline_from_parts, place

    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    pipe = pipeline_from_parts(parts.unet, parts.text, parts.vae, parts.noise_scheduler)
    place(pipe, CPU, torch.float32)
    return pipe


def drawing_of(prompt: str, negative: str | None):
    from lora_trainer.config.prompts import PromptSpec
    from lora_trainer.sampling.generate import Drawing

    spec = PromptSpec(prompt, negative, width=64, height=64, seed=3, guidance_scale=7.0, steps=2, sampler="euler")
    return Drawing(0, spec, 3)


@torch.no_grad()
def drawn_from_prompt_text(pipe, drawing) -> np.ndarray:
    """The image as sampling drew it before: the prompt text handed to diffusers' pipeline."""
    from lora_trainer.sampling.generate import decode
    from lora_trainer.sampling.schedulers import make_scheduler

    spec, config = drawing.spec, pipe.scheduler.config
    pipe.scheduler = make_scheduler(spec.sampler, config, config.prediction_type)
    latents = pipe(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None, num_inference_steps=spec.steps,
                   guidance_scale=spec.guidance_scale, width=spec.width, height=spec.height,
                   generator=torch.Generator().manual_seed(drawing.seed), output_type="latent").images
    return np.asarray(decode(pipe, latents)[0])


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_sampling_at_75_draws_what_the_pipeline_drew_from_the_prompt_text(pipeline, long_caption, negative):
    from lora_trainer.sampling.generate import draw

    drawing = drawing_of(long_caption, negative)
    assert np.array_equal(np.asarray(draw(pipeline, drawing)), drawn_from_prompt_text(pipeline, drawing))


def test_sampling_at_225_sees_the_whole_prompt(pipeline, long_caption):
    from lora_trainer.sampling.generate import draw

    other = long_caption.rsplit(",", 1)[0] + ", golden dragon"
    at_75 = [np.asarray(draw(pipeline, drawing_of(prompt, "blurry"), 75)) for prompt in (long_caption, other)]
    at_225 = [np.asarray(draw(pipeline, drawing_of(prompt, "blurry"), 225)) for prompt in (long_caption, other)]
    assert np.array_equal(*at_75)  # the last tag is past 75 tokens
    assert not np.array_equal(*at_225)


def test_sample_takes_max_token_length_from_the_config_or_the_option(tiny_model_path, tmp_path, capsys):
    from lora_trainer.config.sample_command import sample_request

    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")  # only its name is read here
    raw = small_raw_config(tmp_path)
    raw["data"]["max_token_length"] = 150
    raw["sample"] = {"prompts": ["a red circle"]}
    config = write_yaml(tmp_path / "config.yaml", raw)
    assert sample_request({"config": config, "lora": [str(lora)]}).max_token_length == 150
    assert sample_request({"config": config, "lora": [str(lora)], "max_token_length": "225"}).max_token_length == 225
    assert sample_request({"model": "builtin:tiny-sdxl", "prompt": ["a"]}).max_token_length == 75
    code, _, err = run_cli(["sample", "--model", "builtin:tiny-sdxl", "--prompt", "a", "--max-token-length", "100"], capsys)
    assert code == 2 and err.strip() == "error: --max-token-length: must be one of 75, 150 or 225, got 100"
