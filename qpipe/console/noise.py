"""What reaches the terminal during a run: qpipe's own words and the library warnings that
mean something to a qpipe user. Everything else libraries say goes to the run's log file only.

Libraries print through three channels, and each is brought into ``logging``, where one
console filter decides and the run's log file (a FileHandler) still gets every record whole:

- loggers with a handler of their own that does not propagate (transformers, MLflow and its
  sqlalchemy/alembic loggers, auto-round — which also takes over ``Logger.warning_once``, so
  transformers' once-only warnings come out of *its* logger): for the run they propagate to
  the root handlers instead, and handlers added to them meanwhile are held back;
- ``warnings.warn``: shown as a ``py.warnings`` log record (``logging.captureWarnings``);
- loguru (llm-compressor, compressed-tensors): a sink that writes to the terminal — loguru's
  default, and the one llm-compressor adds on import after resetting loguru — becomes one that
  hands each message to the ``logging`` logger of its package.

On the terminal, a library record passes when it is a WARNING or worse and is not one of the
messages in ``NOISE`` (advice about an install step that is not needed, a setting qpipe
already handles). At the end one line says how many library messages are in the log only.

Progress bars (tqdm) stay on a terminal. Where stderr is not one (``python -m qpipe > log``),
a bar prints nothing while it runs and one line when it closes (``quiet_progress_bars``),
instead of hundreds of carriage-return updates.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("qpipe")

# Library messages that mean nothing to a qpipe user (matched on the message text, whichever
# logger carries it: transformers' warning_once can come out of auto-round's logger).
NOISE: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (what, re.compile(pattern))
    for what, pattern in (
        # decode() on a BPE tokenizer whose config asks for WordPiece clean-up: already ignored
        ("transformers BPE clean-up", r"Ignoring clean_up_tokenization_spaces=True for BPE"),
        # an optional hub kernel for bitsandbytes' CPU 4-bit path; reads like a missed install
        ("bitsandbytes hub kernel", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
        # the sqlite store being created on a first run
        ("MLflow store setup", r"Creating initial MLflow database tables|Updating database tables"),
        # a sqlite store that fails mid-run: qpipe says so in one line (the offline journal)
        ("MLflow store error", r"SQLAlchemy database error"),
        # fp32 on a GPU: qpipe runs bf16 there unless asked otherwise
        ("TorchInductor TF32", r"TensorFloat32 tensor cores for float32 matrix multiplication"),
        # llm-compressor on a CPU-only machine: env_check already says where qpipe runs
        ("llm-compressor device", r"No accelerator available!"),
        ("tokenizers parallelism", r"Disabling tokenizer parallelism"),
        # transformers' save_pretrained after llm-compressor's dispatch: nothing is offloaded
        ("transformers offload", r"Attempting to save a model with offloaded modules"),
        # torch.fx, while llm-compressor traces a model for GPTQ/AWQ: advice to library authors
        ("torch.fx tracing", r"is_fx_tracing will return true for both"),
    )
)

# Loggers that print through a handler of their own and do not propagate to the root.
LIBRARY_LOGGERS = (
    "transformers",
    "mlflow",
    "sqlalchemy.engine",
    "alembic",
    "huey",
    "autoround",
    "torch",
)

_OWN = "qpipe"
_active = False  # a run's terminal filter is in place


def noise_kind(text: str) -> str | None:
    """Which entry of ``NOISE`` the message is (None: not noise)."""
    return next((what for what, pattern in NOISE if pattern.search(text)), None)


def _own(record: logging.LogRecord) -> bool:
    return record.name == _OWN or record.name.startswith(_OWN + ".")


class TerminalFilter(logging.Filter):
    """On the console handlers: qpipe's own records (except a failure's ``✘`` line, which the
    run summary prints once, on one line), library WARNINGs and worse that are not ``NOISE``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: Counter[str] = Counter()  # logger name -> records kept off the terminal

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if _own(record):
            # (a repeat count quoting a noise message is noise too)
            failure = record.levelno >= logging.ERROR and str(record.msg).startswith("✘ ")
            return not failure and noise_kind(text) is None
        if record.levelno >= logging.WARNING and noise_kind(text) is None:
            return True
        source = "warnings" if record.name == "py.warnings" else record.name.split(".")[0]
        self.held[source] += 1
        return False


def _is_file_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler)


def _forward_loguru(message: Any) -> None:
    """A loguru sink: the record as a ``logging`` record of its package's logger."""
    record = message.record
    level = logging.getLevelName(record["level"].name)
    target = logging.getLogger(str(record["name"] or "loguru").split(".")[0])
    target.log(level if isinstance(level, int) else logging.INFO, record["message"])


@contextmanager
def _loguru_through_logging() -> Iterator[None]:
    """loguru sinks that write to the terminal (its default, and the one llm-compressor adds
    on import after resetting loguru) become ``logging`` records for the run."""
    try:
        import loguru._logger as loguru_logger
        from loguru import logger
    except ImportError:  # pragma: no cover - llm-compressor brings loguru
        yield
        return
    add = loguru_logger.Logger.add

    def terminal_to_logging(self, sink, *args, **kwargs):  # noqa: ANN001, ANN202
        if sink is sys.stdout or sink is sys.stderr:
            kwargs.pop("format", None)
            kwargs.pop("colorize", None)
            return add(self, _forward_loguru, *args, format="{message}", **kwargs)
        return add(self, sink, *args, **kwargs)

    loguru_logger.Logger.add = terminal_to_logging
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    try:
        yield
    finally:
        loguru_logger.Logger.add = add
        logger.remove()
        logger.add(sys.stderr, level="INFO")


@contextmanager
def _library_loggers_propagate() -> Iterator[None]:
    """The loggers of ``LIBRARY_LOGGERS`` propagate to the root handlers instead of their
    own, including handlers a library adds while the run goes on (auto-round, on import)."""
    saved: dict[str, tuple[list, bool]] = {}
    for name in LIBRARY_LOGGERS:
        if name in logging.Logger.manager.loggerDict:
            logger = logging.getLogger(name)
            saved[name] = (list(logger.handlers), logger.propagate)
            logger.handlers, logger.propagate = [], True
    add_handler = logging.Logger.addHandler

    def adopt(self: logging.Logger, handler: logging.Handler) -> None:
        if self.name not in LIBRARY_LOGGERS:
            return add_handler(self, handler)
        saved.setdefault(self.name, ([], self.propagate))[0].append(handler)
        self.propagate = True
        return None

    logging.Logger.addHandler = adopt
    try:
        yield
    finally:
        logging.Logger.addHandler = add_handler
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate


@contextmanager
def quiet_progress_bars(terminal: bool | None = None) -> Iterator[None]:
    """Where stderr is not a terminal, each tqdm bar prints one line when it closes (its
    description, count and time) instead of its updates; on a terminal bars are untouched."""
    if terminal is None:
        terminal = sys.stderr.isatty()
    try:
        import tqdm.std as std
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        yield
        return
    if terminal:
        yield
        return
    bar = std.tqdm
    init, close = bar.__init__, bar.close

    def quiet_init(self, *args: Any, **kwargs: Any) -> None:
        if len(args) < 5 and not kwargs.get("disable"):  # tqdm's 5th positional is file
            kwargs["file"] = _Discard()
        init(self, *args, **kwargs)
        self._qpipe_started = time.monotonic()

    def quiet_close(self) -> None:
        started = getattr(self, "_qpipe_started", None)
        if started is not None and not self.disable:
            self._qpipe_started = None
            what = (self.desc or "progress").rstrip(": ")
            count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            log.info("%s: %s (%.1f s)", what, count, time.monotonic() - started)
        close(self)

    bar.__init__, bar.close = quiet_init, quiet_close
    try:
        yield
    finally:
        bar.__init__, bar.close = init, close


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextmanager
def terminal_for_run(log_file: Path | None = None) -> Iterator[TerminalFilter]:
    """For one run: library output through ``logging``, only what means something on the
    terminal, all of it in the log file. Without root handlers (qpipe used as a library, no
    Hydra logging) libraries keep their own output and nothing is filtered."""
    global _active
    terminal = TerminalFilter()
    root = logging.getLogger()
    consoles = [h for h in root.handlers if not _is_file_handler(h)]
    if not root.handlers or _active:  # no logging set up, or a run inside a run
        yield terminal
        return
    import mlflow  # noqa: F401  (its import installs the handlers rerouted below)
    import transformers.utils.logging as hf_logging

    hf_logging.get_logger("transformers")  # transformers adds its handler on first use
    _active = True
    for handler in consoles:
        handler.addFilter(terminal)
    logging.captureWarnings(True)
    try:
        with _library_loggers_propagate(), _loguru_through_logging(), quiet_progress_bars():
            yield terminal
    finally:
        logging.captureWarnings(False)
        for handler in consoles:
            handler.removeFilter(terminal)
        _active = False
        held = sum(terminal.held.values())
        if held and log_file is not None:
            log.info(
                "%d library messages are in %s only (%s)",
                held,
                _shown_path(log_file),
                ", ".join(f"{name} {n}" for name, n in terminal.held.most_common()),
            )
