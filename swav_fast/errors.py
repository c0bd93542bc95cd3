"""Errors that the CLI reports as one clear line and a non-zero exit (no traceback)."""


class SwavFastError(Exception):
    """Base class: a problem with the user's input, data, config or environment."""


class ConfigError(SwavFastError, ValueError):
    """Unknown config key, wrong type, or an impossible combination of settings."""


class DataError(SwavFastError):
    """Missing, empty or unusable dataset."""


class CheckpointError(SwavFastError):
    """A checkpoint that cannot be written or loaded (foreign, truncated, unsafe)."""


class TrainingDiverged(SwavFastError):
    """Training produced non-finite losses too often, or collapsed."""
