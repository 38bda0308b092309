"""SDXL's two CLIP tokenizers, shipped in lora_trainer/model/pretrained/sdxl-base/, against open_clip's own.

open_clip's tokenizer module is loaded by path from the installed open-clip-torch distribution,
which is installed without its dependencies (`pip install --no-deps open-clip-torch==3.3.0`):
`import open_clip` would import its models, which need torchvision and timm. tokenizer.py imports
only ftfy, regex, numpy and torch, and nothing from its own package, so it loads alone, no stubs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from lora_trainer.model.builtin import SDXL_BASE_FOLDER

INSTALL = "pip install -e '.[test]' && pip install --no-deps open-clip-torch==3.3.0"
START, END = 49406, 49407

PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat",
    "Émile Zola's café in Zürich, naïve façade",
    "über straße, ÆØÅ æøå, ñandú, ça va",
    "cafe\u0301 cre\u0300me",  # combining accents: both compose them (NFC)
    "日本の桜と富士山",
    "一只猫坐在窗台上",
    "한국어 프롬프트",
    "москва зимой, αθήνα το καλοκαίρι",
    "مرحبا بالعالم שלום",
    "a dog 🐶 in a 🎩, 😀😀 👩‍🚀 astronaut",
    "1girl, solo, long_hair, looking_at_viewer, blue_eyes, school_uniform",
    "(masterpiece:1.2), (best quality), [worst quality:0.8], ((detailed)), {{cat}}",
    "score_9, score_8_up, rating:safe, source_anime, <lora:zqx_style:0.7>",
    "1024x1024, 4k, 8K UHD, 50mm f/1.8, ISO 100, 3.14159, 2024-01-31",
    "  a   red\tcircle \n\n on  white  ",
    "hello, world... what?? yes; no: maybe - (or) [not] \"quoted\" 'single'",
    "don't stop, it's what we'll do, they're here, I'd've",
    "#hashtag @user https://example.com/a_b?x=1",
    "α+β=γ, 50% off, $9.99, ©2024, ™, °C, ~/path\\to|file",
    "zqxjv lts_shapes wearing a hat",
    "",
    # More than 77 tokens: compared whole, and truncated to 77 with the end token kept last.
    ", ".join(["masterpiece", "best quality", "1girl", "long_hair", "(smile:1.1)", "outdoors", "cherry blossoms"] * 6),
]


@functools.cache
def open_clip_tokenizer():
    """open_clip's SimpleTokenizer; a test that needs it fails, never skips, when it is missing."""
    try:
        distribution = importlib.metadata.distribution("open-clip-torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"open-clip-torch is not installed; install the test requirements: {INSTALL}", pytrace=False)
    path = Path(distribution.locate_file("open_clip/tokenizer.py"))
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:  # ftfy or regex
        pytest.fail(f"open_clip's tokenizer needs {error.name}; install the test requirements: {INSTALL}", pytrace=False)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def shipped() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    return (
        CLIPTokenizer.from_pretrained(SDXL_BASE_FOLDER, subfolder="tokenizer"),
        CLIPTokenizer.from_pretrained(SDXL_BASE_FOLDER, subfolder="tokenizer_2"),
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_shipped_tokenizers_give_open_clips_ids(shipped, prompt):
    reference = open_clip_tokenizer()
    whole = [START, *reference.encode(prompt), END]
    padded = reference(prompt)[0].tolist()  # open_clip's 77: truncated with the end token last, zeros after
    length = min(len(whole), 77)
    first, second = shipped
    for tokenizer in shipped:
        assert tokenizer(prompt, truncation=False).input_ids == whole
    assert second(prompt, padding="max_length", max_length=77, truncation=True).input_ids == padded
    padded_with_end = padded[:length] + [END] * (77 - length)
    assert first(prompt, padding="max_length", max_length=77, truncation=True).input_ids == padded_with_end


def test_ids_quoted_from_public_sources(shipped):
    first, second = shipped
    # Bumblebee's CLIP tokenizer test, for openai/clip-vit-base-patch32 (the same vocabulary):
    # https://github.com/elixir-nx/bumblebee/blob/main/test/bumblebee/text/clip_tokenizer_test.exs
    for tokenizer in shipped:
        assert tokenizer(["a photo of a cat", "a photo of a dog"]).input_ids == [
            [49406, 320, 1125, 539, 320, 2368, 49407],
            [49406, 320, 1125, 539, 320, 1929, 49407],
        ]
    # diffusers issue 4153 prints open_clip.tokenize("! !! !!!") and what SDXL's tokenizer_2 gives under
    # transformers, whose pad token "!" is a special token and so splits every "!" off as id 0:
    # https://github.com/huggingface/diffusers/issues/4153
    prompt = "! !! !!!"
    assert first(prompt).input_ids == [49406, 256, 748, 995, 49407]
    assert open_clip_tokenizer()(prompt)[0].tolist()[:6] == [49406, 256, 748, 995, 49407, 0]
    assert second(prompt, padding="max_length", max_length=77).input_ids == [49406, 0, 0, 0, 0, 0, 0, 49407] + [0] * 69


@pytest.mark.parametrize("prompt", ["“curly quotes”", "tom &amp; jerry", "ﬁne ＡＢＣ"])
def test_open_clips_text_fixing_is_not_ours(shipped, prompt):
    """open_clip first runs ftfy.fix_text and html.unescape (uncurled quotes, entities, ligatures, full-width
    letters); transformers' CLIPTokenizer, so SDXL's tokenizers under diffusers too, does not. PROMPTS avoids these."""
    reference = open_clip_tokenizer()
    for tokenizer in shipped:
        assert tokenizer(prompt, add_special_tokens=False).input_ids != reference.encode(prompt)


def test_sizes_special_tokens_and_padding(shipped):
    first, second = shipped
    for tokenizer in shipped:
        assert len(tokenizer) == 49408
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (START, END, END)
        assert tokenizer.model_max_length == 77
    assert (first.pad_token, first.pad_token_id) == ("<|endoftext|>", 49407)
    assert (second.pad_token, second.pad_token_id) == ("!", 0)
    assert first("a cat", padding="max_length", max_length=77).input_ids[4:] == [49407] * 73
    assert second("a cat", padding="max_length", max_length=77).input_ids[4:] == [0] * 73


def test_tiny_sdxl_uses_the_shipped_tokenizers_and_sdxls_token_ids(tiny_model_path, shipped):
    from transformers import CLIPTextConfig

    for index, subfolder in enumerate(("tokenizer", "tokenizer_2")):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path, subfolder=subfolder)
        assert tokenizer.get_vocab() == shipped[index].get_vocab()
        assert tokenizer.pad_token_id == shipped[index].pad_token_id
    for subfolder in ("text_encoder", "text_encoder_2"):
        config = CLIPTextConfig.from_pretrained(tiny_model_path, subfolder=subfolder)
        assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49408, 0, 2, 1)


def test_tiny_sdxl_pools_at_the_first_end_token(tiny_model_path):
    """With SDXL's legacy eos_token_id 2 transformers pools at the highest id; here that is the first end token."""
    from transformers import CLIPTextModelWithProjection

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path, subfolder="tokenizer_2")
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_model_path, subfolder="text_encoder_2").eval()
    assert encoder.config.eos_token_id == 2
    ids = tokenizer(["a red circle", "zqx wearing a hat, white background"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (ids[:, -1] == 0).all(), "padded with '!'"
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
        # The last layer's output, before the final LayerNorm, normed and projected here.
        final = encoder.text_model.final_layer_norm(output.hidden_states[-1])
        first_end = [row.tolist().index(tokenizer.eos_token_id) for row in ids]
        expected = encoder.text_projection(final[torch.arange(len(ids)), first_end])
    assert first_end[0] == 4 and max(first_end) < 76  # [start, a, red, circle, end, !, ...]
    torch.testing.assert_close(output.text_embeds, expected)
