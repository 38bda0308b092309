"""Folders we will write to, checked when the config loads, so a bad location fails before any work is done."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lora_trainer.errors import ConfigError

_FIX = "choose another folder or fix its permissions"


def check_writable(path: Path, field: str) -> None:
    """Raise `ConfigError` (one line naming `field` and `path`) unless the folder `path` can be written to.

    `path` need not exist yet: then the nearest existing ancestor must be a folder we can create it in.
    Nothing is created.
    """
    existing = path
    while True:
        try:
            status = os.stat(existing)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            # Missing, under a file, or behind a folder we may not search: the ancestors will tell which.
            if os.path.islink(existing) and existing == path:
                raise ConfigError(
                    f"{field}: {path} is a symbolic link to a missing target; remove the link or choose another folder"
                ) from None
            if existing.parent == existing:
                raise ConfigError(f"{field}: {path} cannot be created; {_FIX}") from None
            existing = existing.parent
            continue
        break
    if not stat.S_ISDIR(status.st_mode):
        if existing == path:
            raise ConfigError(f"{field}: {path} is a file, not a folder; choose a folder")
        raise ConfigError(f"{field}: {existing} is a file, so {path} cannot be created; choose another folder")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    where = f"{path} is" if existing == path else f"{path} cannot be created: {existing} is"
    if _read_only_file_system(existing):
        raise ConfigError(f"{field}: {where} on a read-only file system; choose another folder")
    raise ConfigError(f"{field}: {where} not writable by this user; {_FIX}")


def _read_only_file_system(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
