"""Errors that qpipe reports to the user as one clear line, without a traceback."""


class QpipeError(Exception):
    """A problem the user can fix (bad config value, missing weights, budget exceeded).

    The CLI prints ``str(err)`` as one line and exits non-zero; the runner marks the MLflow
    run FAILED with the same text.
    """


class ConfigError(QpipeError):
    """A config value is invalid; the message names the value and what would be valid."""


class BackendUnavailable(QpipeError):
    """The chosen quantization backend cannot run on this machine."""


class DoesNotFit(QpipeError):
    """The memory budget says the model cannot fit on the chosen hardware."""


class WeightsUnavailable(QpipeError):
    """Model weights cannot be fetched (no hub access) and no local alternative was given."""


class DiskFull(QpipeError):
    """A write did not fit on the disk; the message names the path and the bytes needed."""


class CheckpointError(QpipeError):
    """A checkpoint folder is corrupt, incomplete or does not match its config; the message
    names the file and what is wrong. Found when the folder is opened, before weights load."""


class UnsafeCheckpoint(QpipeError):
    """A checkpoint would run code (custom modelling code, pickled weights) that the user has
    not allowed with model.trust_remote_code / model.allow_pickle."""


class OutOfMemory(QpipeError):
    """The device ran out of memory; the message has the requested and free memory and the
    estimate."""


class ConfigRefusal(SystemExit):
    """A refusal raised where a library reports ordinary errors with a traceback (Hydra while it
    composes or runs its callbacks): ``python -m qpipe`` prints the message as one line and
    exits 2. A SystemExit, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message
