"""Errors that the CLI reports as one clear line and a non-zero exit (no traceback).

The base class and the config / data errors are defined in :mod:`pipelines.errors` (the data layer
below this package raises them too); the trainer's own errors are added here.
"""
from pipelines.errors import ConfigError, DataError, SwavFastError

__all__ = ["CheckpointError", "ConfigError", "DataError", "SwavFastError", "TrainingDiverged"]


class CheckpointError(SwavFastError):
    """A checkpoint that cannot be written or loaded (foreign, truncated, unsafe)."""


class TrainingDiverged(SwavFastError):
    """Training produced non-finite losses too often, or collapsed."""
