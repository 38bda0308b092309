"""Errors the user can fix. The CLI prints their message on one line, without a traceback."""


class UserError(Exception):
    """Bad input or a failed run the user can act on; the message names the file or field and the fix."""

    exit_code = 1


class ConfigError(UserError):
    """The config (or a `--set` override) is invalid; nothing has been loaded or written yet."""

    exit_code = 2


class ModelFileError(UserError):
    """A model file is not what the config says it is (wrong family, a LoRA, truncated, a pickle); nothing was loaded."""

    exit_code = 2
