"""Errors a person can fix. The CLI prints them without a traceback and exits with the error's code.

One class per kind of failure, each with its exit code, so that the same failure gives the same code
and message from every command (`tuneship eval`, `export`, `deploy`, `template check` and `run`):

| exit | class | failure |
| --- | --- | --- |
| 1 | `TuneshipError` (and the classes without their own code) | anything else a person can fix |
| 2 | `ConfigError` | the config file or a --set override is invalid |
| 3 | `TrainingStopped`, `DiskFull` | a guard stopped the work cleanly (non-finite loss, full disk) |
| 4 | `GateFailed` | an evaluation gate was not met |
| 5 | `ContractBroken` | the chat template renders differently than in training |
"""

from __future__ import annotations

from typing import Literal

StageStatus = Literal["done", "skipped", "failed", "not reachable"]


class TuneshipError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""

    exit_code = 1
    stage_status: StageStatus = "failed"  # what a stage that ends with this error records in the manifest


class ConfigError(TuneshipError):
    """The config file or a --set override is invalid."""

    exit_code = 2


class DataError(TuneshipError):
    """A data source cannot be read, or leaves nothing usable."""


class SourceError(DataError):
    """A local file or bucket object cannot be reached."""


class ModelError(TuneshipError):
    """The base model cannot be resolved or loaded, or a run has no trained adapter yet."""


class ChatFormatError(TuneshipError):
    """The chat template is missing, unknown, or would train something wrong."""


class PreflightError(TuneshipError):
    """A check before training found examples that would train the wrong thing."""


class TrainingStopped(TuneshipError):
    """A guard stopped training cleanly (non-finite loss, full disk, ...)."""

    exit_code = 3


class DiskFull(TrainingStopped):
    """Not enough free space for an artifact (checkpoint, adapter, merged model, GGUF)."""


class GateFailed(TuneshipError):
    """An evaluation gate (eval.min_stop_rate, eval.min_non_empty_rate, ...) was not met."""

    exit_code = 4

    def __init__(self, failures: list[str]):
        super().__init__("evaluation gates not met:\n  " + "\n  ".join(failures))
        self.failures = failures


class ContractBroken(TuneshipError):
    """The renderers of the chat template disagree (training, HF, GGUF, Ollama)."""

    exit_code = 5

    def __init__(self, differences: list[str]):
        super().__init__(
            f"template contract broken: the renderers disagree on {len(differences)} probe(s); nothing "
            "is deployed with a template that differs from training:\n" + "\n".join(differences)
        )
        self.differences = differences
