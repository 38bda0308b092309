"""Progress bars (rate and ETA) for long work, on stderr so stdout stays clean for results."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def progress_bar(items: Iterable[Item] | None = None, **options: Any) -> tqdm:
    options.setdefault("file", sys.stderr)
    options.setdefault("dynamic_ncols", True)
    options.setdefault("smoothing", 0.1)
    return tqdm(items, **options)
