"""Errors a user can cause. The CLI prints their message (one actionable sentence) without a
traceback and exits non-zero; anything else is a bug and keeps its traceback."""


class ScalegenError(Exception):
    """Base class: the message must say what is wrong and what to do."""


class ConfigError(ScalegenError):
    """A config file, key or value is wrong."""


class DataError(ScalegenError):
    """A corpus, prompt or shard is unusable."""


class CheckpointError(ScalegenError):
    """A run directory or checkpoint is missing or unreadable."""


class WeightsError(ScalegenError):
    """Model weights are missing or in the wrong layout."""


class ExportError(ScalegenError):
    """An asset cannot be written (empty mesh, unwritable path, unknown format)."""


class TrainingError(ScalegenError):
    """Training cannot go on (e.g. the loss diverged)."""


class Preempted(ScalegenError):
    """Training stopped on SIGTERM after writing a checkpoint; the CLI exits with ``exit_code`` (75,
    EX_TEMPFAIL) so a job script can requeue the run."""

    exit_code = 75


class Interrupted(ScalegenError):
    """A long command stopped on the first Ctrl-C after keeping its work (a checkpoint written, finished
    files kept); the message says how to continue. The CLI exits with ``exit_code`` (130, as a shell's
    128 + SIGINT)."""

    exit_code = 130
