"""The shapes classifier that scores what the example model draws is itself right on clean renders,
and the example's trigger word reaches the text encoders as real tokens."""

from __future__ import annotations

import random
import sys

import pytest
from conftest import REPO
from PIL import Image

sys.path.insert(0, str(REPO / "scripts"))

import make_example_dataset  # noqa: E402
import shapes  # noqa: E402


def test_the_classifier_names_every_rendered_colour_and_shape():
    rng = random.Random(0)
    cases = [(colour, shape) for colour in shapes.COLOURS for shape in shapes.SHAPES] * 20
    right = sum(shapes.classify(shapes.render(shapes.random_picture(rng, colour, shape))) == (colour, shape) for colour, shape in cases)
    assert right == len(cases)  # 300 pictures, every colour with every shape, random places and sizes


def test_the_classifier_tells_nothing_from_a_blank_or_grey_picture():
    assert shapes.classify(Image.new("RGB", (64, 64), "white")) == (None, None)
    assert shapes.classify(Image.new("RGB", (64, 64), (128, 128, 128))) == (None, None)


@pytest.mark.parametrize("colour", ["red", "cyan"])
def test_the_classifier_is_not_fooled_by_a_shifted_shade(colour):
    rng = random.Random(1)
    base = shapes.COLOURS[colour]
    shifted = tuple(max(0, min(255, channel + 25)) for channel in base)
    shapes.COLOURS["shifted"] = shifted
    try:
        picture = shapes.render(shapes.random_picture(rng, "shifted", "square"))
    finally:
        del shapes.COLOURS["shifted"]
    assert shapes.classify(picture) == (colour, "square")


def test_the_trigger_word_is_made_of_real_tokens():
    from lora_trainer.model.builtin import make_tiny_tokenizers

    for tokenizer in make_tiny_tokenizers():
        ids = tokenizer(make_example_dataset.TRIGGER, add_special_tokens=False).input_ids
        # CLIP's unknown token is its end token: a trigger falling back to it would teach "any unknown word".
        assert ids and tokenizer.eos_token_id not in ids and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids).strip() == make_example_dataset.TRIGGER


def test_the_example_dataset_shows_the_new_concept():
    images = sorted((REPO / "datasets_example").glob("*.png"))
    assert len(images) == make_example_dataset.COUNT
    for path in images:
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        shape = caption.split()[-1]
        assert caption == make_example_dataset.trigger_caption(shape)
        with Image.open(path) as image:
            assert shapes.classify(image) == (make_example_dataset.CONCEPT_COLOUR, shape)
