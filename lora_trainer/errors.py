"""Errors the user can fix. The CLI prints their message on one line, without a traceback."""

from pathlib import Path


class UserError(Exception):
    """Bad input or a failed run the user can act on; the message names the file or field and the fix."""

    exit_code = 1


class ConfigError(UserError):
    """The config (or a `--set` override) is invalid; nothing has been loaded or written yet."""

    exit_code = 2


class ModelFileError(UserError):
    """A model file is not what the config says it is (wrong family, a LoRA, truncated, a pickle); nothing was loaded."""

    exit_code = 2


class WriteFailed(UserError):
    """Writing a file or folder failed (disk full, quota, permissions); the temporary is gone, the previous file unchanged.

    `needed` and `free` are in bytes, None where not known.
    """

    def __init__(self, message: str, path: Path, needed: int | None = None, free: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.needed = needed
        self.free = free

    def __reduce__(self):  # so it survives pickling, e.g. out of a DataLoader worker
        return type(self), (str(self), self.path, self.needed, self.free)
