"""Atomic file writes: every file we write appears whole under its final name or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    with _temporary_beside(path) as temporary:
        # O_EXCL on a fresh name; mode 0o666 lets the umask decide, as for any ordinary file.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def directory_atomic(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it becomes `path`.

    If another process created `path` first, its folder wins and ours is discarded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield temporary
        try:
            os.rename(temporary, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


@contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    # Same folder, so the final rename never crosses a file system and stays atomic.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)
