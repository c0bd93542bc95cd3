"""Errors that the CLI reports as one clear line and a non-zero exit (no traceback).

They live at the bottom of the stack (``pipelines``) so that the data layer raises the same classes
as the trainer; :mod:`swav_fast.errors` re-exports them and adds the trainer's own.
"""


class SwavFastError(Exception):
    """Base class: a problem with the user's input, data, config or environment."""


class ConfigError(SwavFastError, ValueError):
    """Unknown config key, wrong type, or an impossible combination of settings."""


class DataError(SwavFastError):
    """Missing, empty or unusable dataset."""
