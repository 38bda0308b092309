"""Captions longer than `data.max_token_length`: counted before training, summed up in one line, listed in a file.

The text encoders see the first 75, 150 or 225 tokens of a caption and the rest is cut, which no picture
would tell. So before the first step every cut caption is listed, with its length and how many tokens it
loses, in `<output.dir>/<output.name>-cut-captions.txt`, and one warning line sums them up. Tokens are
counted with the first tokenizer, on the caption as the dataset writes it (prefix and suffix included,
before tag shuffling and dropout).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.cache.fill import FilledCaches
from lora_trainer.config.schema import Config
from lora_trainer.data.captions import fixed_caption
from lora_trainer.files import write_text_atomic
from lora_trainer.model.conditioning import token_counts

log = logging.getLogger(__name__)

LONGEST_SETTING = 225  # the largest data.max_token_length


@dataclass(frozen=True)
class CutCaption:
    path: Path  # the image the caption belongs to
    tokens: int  # the caption's length, start and end token not counted
    lost: int  # tokens past max_token_length


def cut_captions_path(config: Config) -> Path:
    return config.output.dir / f"{config.output.name}-cut-captions.txt"


def report_cut_captions(config: Config, caches: FilledCaches, tokenizer) -> list[CutCaption]:
    """List the run's cut captions (training and validation) in their file and warn in one line; without any,
    remove the file an earlier run of this name may have left."""
    length = config.data.max_token_length
    cuts = find_cut_captions(run_captions(config, caches), tokenizer, length)
    path = cut_captions_path(config)
    if not cuts:
        path.unlink(missing_ok=True)
        return cuts
    write_text_atomic(path, cut_captions_listing(cuts, length))
    log.warning(cut_captions_summary(cuts, length, path))
    return cuts


def run_captions(config: Config, caches: FilledCaches) -> list[tuple[Path, str]]:
    """(image, caption before any randomness) for every training and validation image."""
    captioned = [
        (record.image_path, fixed_caption(record.caption, config.datasets[record.dataset_index]))
        for record in caches.training.records
    ]
    if caches.validation is not None:
        validation = caches.validation
        captioned += [(item.record.image_path, caption) for item, caption in zip(validation.items, validation.captions)]
    return captioned


def find_cut_captions(captioned: Sequence[tuple[Path, str]], tokenizer, max_token_length: int) -> list[CutCaption]:
    distinct = sorted({caption for _, caption in captioned})
    counts = dict(zip(distinct, token_counts(tokenizer, distinct)))
    return [
        CutCaption(path, counts[caption], counts[caption] - max_token_length)
        for path, caption in captioned
        if counts[caption] > max_token_length
    ]


def cut_captions_summary(cuts: Sequence[CutCaption], max_token_length: int, listing: Path) -> str:
    lost = [cut.lost for cut in cuts]
    examples = ", ".join(str(cut.path) for cut in cuts[:3]) + (", ..." if len(cuts) > 3 else "")
    counted = "1 caption is" if len(cuts) == 1 else f"{len(cuts)} captions are"
    line = (
        f"{counted} longer than data.max_token_length ({max_token_length} tokens) and cut: at most {max(lost)} "
        f"tokens lost, {sum(lost) / len(lost):.1f} on average ({examples}); all listed in {listing}"
    )
    if max_token_length < LONGEST_SETTING:
        line += f"; data.max_token_length: {LONGEST_SETTING} keeps up to {LONGEST_SETTING}"
    return line


def cut_captions_listing(cuts: Sequence[CutCaption], max_token_length: int) -> str:
    header = f"# captions longer than data.max_token_length ({max_token_length} tokens); tab-separated: image, tokens, tokens lost"
    return "\n".join([header, *(f"{cut.path}\t{cut.tokens}\t{cut.lost}" for cut in cuts)]) + "\n"
