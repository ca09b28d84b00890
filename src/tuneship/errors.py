"""Errors a person can fix. The CLI prints them without a traceback and exits non-zero."""


class TuneshipError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""

    exit_code = 1


class ConfigError(TuneshipError):
    """The config file or a --set override is invalid."""

    exit_code = 2


class DataError(TuneshipError):
    """A data source cannot be read, or leaves nothing usable."""


class SourceError(DataError):
    """A local file or bucket object cannot be reached."""


class ModelError(TuneshipError):
    """The base model cannot be resolved or loaded."""


class ChatFormatError(TuneshipError):
    """The chat template is missing, unknown, or would train something wrong."""


class PreflightError(TuneshipError):
    """A check before training found examples that would train the wrong thing."""


class TrainingStopped(TuneshipError):
    """A guard stopped training cleanly (non-finite loss, full disk, ...)."""

    exit_code = 3
