"""User-facing errors: each names the problem and the fix, and the CLI prints them without a traceback."""

from __future__ import annotations


class DfkaError(Exception):
    """Base class for errors caused by input, configuration or the environment, not by a bug.

    ``problem`` says what is wrong, ``fix`` says what the user should do about it.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class ConfigError(DfkaError):
    """An experiment or pipeline configuration is invalid."""


class DataError(DfkaError):
    """A dataset is missing or malformed."""


class DataFreeViolation(DfkaError):
    """A data-free stage tried to read real training images."""


class LabelError(DfkaError):
    """A label request (label names, target set) is invalid."""


class BundleError(DfkaError):
    """A teacher bundle or TargetNet bundle is missing, tampered with or malformed."""


class CompatibilityError(DfkaError):
    """Teachers, or a teacher and the student, cannot be amalgamated together."""


class StorageError(DfkaError):
    """The object store or a local path could not be read or written."""


class CheckpointError(DfkaError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


class TrainingDiverged(DfkaError):
    """A loss became NaN or infinite during training."""


class StackError(DfkaError):
    """The local SeaweedFS + MLflow stack could not be started or reached."""


def describe_validation(err: Exception, root: str = "value") -> str:
    """A pydantic ``ValidationError`` as one line: ``where: what; where: what`` (``root`` for the top)."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err).splitlines()[0]
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in errors())


class RankFailed(DfkaError):
    """A process of a data-parallel stage (``--nproc``, ``torchrun``) died or failed; the stage failed."""
