"""Progress (rate and ETA) for long work, on stderr so stdout stays clean for results.

On a terminal this is a tqdm bar. In a log file or a pipe (`2>log.txt`, CI) a bar is thousands of
`\\r`-joined frames on one line, so there we print plain lines instead, one per 5% of the work or per
30 seconds, whichever comes first:

    training: 16/40 steps, loss 0.1234, lr 1.00e-03, 2.3 steps/s, ETA 0:07
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")

LINES_PER_RUN = 20  # one per 5%
SECONDS_PER_LINE = 30.0  # a slow run still shows it is alive between marks


def progress_bar(items: Iterable[Item] | None = None, **options: Any) -> tqdm | LineProgress[Item]:
    options.setdefault("file", sys.stderr)  # read now, so a redirected stderr is honoured
    if _is_terminal(options["file"]):
        options.setdefault("dynamic_ncols", True)
        options.setdefault("smoothing", 0.1)
        return tqdm(items, **options)
    return LineProgress(items, **options)


def _is_terminal(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LineProgress(Generic[Item]):
    """The part of tqdm's interface we use, printing plain lines instead of redrawing a bar."""

    def __init__(
        self,
        items: Iterable[Item] | None = None,
        *,
        desc: str = "",
        total: float | None = None,
        unit: str = "it",
        unit_scale: bool = False,
        initial: float = 0,
        disable: bool = False,
        file: Any = None,
        clock: Callable[[], float] = time.monotonic,
        **_: Any,  # tqdm's drawing options (leave, dynamic_ncols, smoothing, ...) mean nothing here
    ) -> None:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.items, self.desc, self.total, self.unit = items, desc, total, unit
        self.unit_scale, self.disable, self.file, self.clock = unit_scale, disable, file or sys.stderr, clock
        self.n = self.last_n = self.initial = initial  # a resumed run starts part-way
        self.postfix: dict[str, Any] = {}
        self.start = self.last_time = clock()
        self.closed = False

    def __iter__(self) -> Iterator[Item]:
        if self.items is None:
            raise TypeError("this progress bar was made without items to iterate over")
        try:
            for item in self.items:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress[Item]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if self._mark(self.n) > self._mark(self.last_n) or now - self.last_time >= SECONDS_PER_LINE:
            self._print(now)

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._print(self.clock())
        self.closed = True

    def _mark(self, n: float) -> int:
        return int(n * LINES_PER_RUN // self.total) if self.total else 0

    def _print(self, now: float) -> None:
        self.last_n, self.last_time = self.n, now
        if not self.disable:
            print(self.line(now), file=self.file, flush=True)

    def line(self, now: float) -> str:
        # Scaled counts read like tqdm's ("1.23G/6.94GB"); plain ones like prose ("16/40 steps").
        units = self.unit if self.unit_scale or self.unit.isupper() else self.unit + "s"
        space = "" if self.unit_scale else " "
        done = self._count(self.n) + (f"/{self._count(self.total)}" if self.total else "")
        parts = [f"{self.desc}: {done}{space}{units}" if self.desc else f"{done}{space}{units}"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        elapsed = now - self.start
        if elapsed > 0 and self.n > self.initial:
            rate = (self.n - self.initial) / elapsed
            parts.append(f"{self._count(rate) if self.unit_scale else _rate(rate)}{space}{units}/s")
            if self.total:
                parts.append(f"ETA {_clock_time(max(self.total - self.n, 0) / rate)}")
        return ", ".join(parts)

    def _count(self, n: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(n)
        return str(int(n)) if n == int(n) else f"{n:.1f}"


def _rate(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"  # a slow run's 0.05 steps/s must not read 0.1


def _clock_time(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
