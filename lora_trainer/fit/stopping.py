"""Ctrl-C and SIGTERM: during training the first one finishes the step and saves; otherwise, and the second
time, the process stops at once.

Stopping at once never leaves half a file: every file is written under a temporary name and renamed,
and a temporary name left behind by a kill is removed by the next run. A pre-empted cloud machine sends
SIGTERM and waits a little before it kills, which is enough to finish a step and save.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """Stopped at once by a signal; the exit code is the shell's for it (130 for Ctrl-C, 143 for SIGTERM).

    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it; not a KeyboardInterrupt,
    which Typer would turn into a bare exit code 130, SIGTERM's 143 and our message lost.
    """

    def __init__(self, signal_number: int):
        super().__init__(SIGNAL_NAMES.get(signal_number, f"signal {signal_number}"))
        self.exit_code = 128 + signal_number


class TrainingStopped(Exception):
    """Training stopped on request after a whole step, with its state and LoRA saved."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopSignals:
    """Catches SIGINT and SIGTERM for one `train`. Outside `graceful()` a signal stops at once (Interrupted);
    inside it the first is only recorded, for the loop to act on after the step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._graceful = False
        self._previous: dict[int, Any] = {}

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
            yield self
            return
        for number in SIGNAL_NAMES:
            self._previous[number] = signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)

    @contextmanager
    def graceful(self) -> Iterator[None]:
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    def _handle(self, number: int, _frame: Any) -> None:
        if self._graceful and self.received is None:
            self.received = number
            print(
                f"\n{SIGNAL_NAMES[number]}: finishing this step, then saving the state and the LoRA "
                f"({SIGNAL_NAMES[number]} again stops at once, saving nothing more)",
                file=sys.stderr, flush=True,
            )
            return
        raise Interrupted(number)


def shared_stop_request(stop: StopSignals, accelerator: Any) -> int | None:
    """The signal any process received, the same answer on every process (so none waits for another
    that has left the loop); a single process asks nothing of the others."""
    if accelerator.num_processes == 1:
        return stop.received
    import torch
    import torch.distributed as distributed

    flag = torch.tensor([stop.received or 0], device=accelerator.device)
    distributed.all_reduce(flag, op=distributed.ReduceOp.MAX)
    return int(flag.item()) or None
