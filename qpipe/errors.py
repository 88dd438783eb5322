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
