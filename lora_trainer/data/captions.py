"""Per-dataset caption options, applied each time an image is seen: tag shuffle and dropout, prefix, suffix.

The caption file's tags are shuffled (the first `keep_tokens` stay in front) and thinned by
`tag_dropout`; the prefix and suffix are added around the result so a trigger word always stays first;
`caption_dropout` replaces the whole caption, prefix and suffix included, by the empty caption (which
teaches the unconditional prediction that classifier-free guidance relies on).
"""

from __future__ import annotations

import random

from lora_trainer.config.data import DatasetConfig


def split_tags(caption: str, separator: str) -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def join_tags(tags: list[str], separator: str) -> str:
    """Written back the way people write them: "a, b" and "a; b", but "a | b"."""
    mark = separator.strip()
    if not mark:
        return " ".join(tags)
    return (f"{mark} " if mark in ",;" else f" {mark} ").join(tags)


def training_caption(caption: str, options: DatasetConfig, rng: random.Random) -> str:
    """The caption one training step sees; every random choice comes from `rng`."""
    if options.caption_dropout and rng.random() < options.caption_dropout:
        return ""
    if options.caption_varies:
        caption = _vary_tags(caption, options, rng)
    return _frame(caption, options)


def fixed_caption(caption: str, options: DatasetConfig) -> str:
    """The caption when no random option applies (what the text-embedding cache stores)."""
    return _frame(caption, options)


def _vary_tags(caption: str, options: DatasetConfig, rng: random.Random) -> str:
    tags = split_tags(caption, options.tag_separator)
    kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.tag_dropout:
        rest = [tag for tag in rest if rng.random() >= options.tag_dropout]
    if options.shuffle_tags:
        rng.shuffle(rest)
    return join_tags(kept + rest, options.tag_separator)


def _frame(caption: str, options: DatasetConfig) -> str:
    return " ".join(part for part in (options.caption_prefix.strip(), caption, options.caption_suffix.strip()) if part)
