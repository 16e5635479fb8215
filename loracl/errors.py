"""User-facing errors: each one is a single line that says what went wrong and where.

The CLI prints `error: <message>` for these and exits with status 2; any other exception is a bug and
keeps its traceback.
"""


class LoraclError(Exception):
    """An error caused by the user's input (config, data, weights), not by a bug."""


class ConfigError(LoraclError):
    pass


class DataError(LoraclError):
    pass


class WeightsError(LoraclError):
    pass


class TrainingDiverged(LoraclError):
    pass


class CheckpointError(LoraclError):
    """A checkpoint that cannot be read (truncated, foreign, an old pickle) or written (full disk)."""
