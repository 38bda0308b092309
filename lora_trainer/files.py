"""Atomic file writes: every file we write appears whole under its final name or not at all.

A write goes to a temporary name beside its target, `.{name}.{pid}.{8 hex}.tmp`, and is renamed over the
target only once it is complete and on disk. Any OS failure on the way (disk full, quota, permissions)
becomes one `WriteFailed` line naming the file; the temporary is removed and the previous file is untouched.
A process killed mid-write leaves its temporary behind; `remove_stale_temporaries` clears those of dead pids.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from lora_trainer.errors import UserError, WriteFailed

# Written in slices, so a failure can come (and be tested) after part of the data is on disk.
_CHUNK = 8 * 1024 * 1024
# Our temporaries, files and folders alike: `.{name}.{pid}.{8 hex}.tmp`. Nothing else is ever removed.
TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT}


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    Raises `WriteFailed` (one line, naming `path`) on any OS error; `path` then is as it was before.
    """
    temporary = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL on a fresh name; mode 0o666 lets the umask decide, as for any ordinary file.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise write_failed(path, error, needed=len(data)) from error
    except BaseException:
        _remove(temporary)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def directory_atomic(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it becomes `path`.

    If another process created `path` first, its folder wins and ours is discarded. An OS error while
    making the folder, inside the block or at the final rename becomes `WriteFailed` naming `path`; a
    `UserError` from the block passes through as it is. The temporary folder is removed in every case.
    """
    temporary = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
    except OSError as error:
        raise write_failed(path, error) from error
    try:
        try:
            yield temporary
        except UserError:
            raise
        except OSError as error:
            raise write_failed(path, error) from error
        try:
            os.rename(temporary, path)
        except OSError as error:
            if not path.is_dir():
                raise write_failed(path, error) from error
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def temporary_name(path: Path) -> Path:
    """A fresh temporary name beside `path`; the same folder, so the final rename stays atomic."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def remove_stale_temporaries(folder: Path, depth: int = 0) -> int:
    """Remove the temporaries (files and folders) that processes no longer running left in `folder`.

    Looks `depth` levels of subfolders down too (1 for the latent cache's `xx/` folders). Only names of
    the form `.{name}.{pid}.{8 hex}.tmp` whose pid is not a live process on this machine are removed;
    those of live processes, ours included, are kept. Returns how many were removed (0 for a missing folder).
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = TEMPORARY_NAME.fullmatch(entry.name)
        if match is None:
            if depth > 0 and _is_real_folder(entry):
                removed += remove_stale_temporaries(Path(entry.path), depth - 1)
            continue
        if _process_is_alive(int(match.group(1))):
            continue
        try:
            if _is_real_folder(entry):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another process cleaned it up first
        except OSError:
            continue
        removed += 1
    return removed


def write_failed(path: Path, error: OSError, needed: int | None = None) -> WriteFailed:
    """The one-line error for an OS failure writing `path`: the reason, for a full disk the space, and
    whether the previous `path` is still there unchanged."""
    reason = error.strerror or str(error) or type(error).__name__
    space_error = error.errno in _SPACE_ERRORS
    free = _free_space(path) if space_error else None
    message = f"cannot write {path}: {reason}"
    if space_error:
        amounts = []
        if needed is not None:
            amounts.append(f"needed {human_size(needed)}")
        if free is not None:
            amounts.append(f"{human_size(free)} free")
        if amounts:
            message += f" ({', '.join(amounts)})"
    if _exists(path):
        message += f"; the previous {path} is unchanged"
    return WriteFailed(message, path=path, needed=needed, free=free)


def human_size(size: int) -> str:
    """`532 B`, `12.3 kB`, `1.1 MB`, `4.0 GB` (decimal units, one decimal)."""
    if size < 1000:
        return f"{size} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 999.95 or unit == "GB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += _write_some(descriptor, view[offset : offset + _CHUNK])


def _write_some(descriptor: int, chunk: memoryview) -> int:
    return os.write(descriptor, chunk)


def _remove(temporary: Path) -> None:
    with suppress(OSError):
        temporary.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _free_space(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            if folder.is_dir():
                return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _is_real_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _process_is_alive(pid: int) -> bool:
    """Whether `pid` is a running process on this machine; anything we cannot tell counts as alive."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True
    return True
