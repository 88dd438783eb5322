"""Library messages that repeat on every call are shown once per run, with their count at the end.

bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" through
``logging`` on every int8 matmul (hundreds of lines per run): logging, unlike ``warnings``, has
no once-per-place rule. A filter on the root handlers lets the first copy of each library
WARNING through and counts the rest; ``warnings.warn`` calls get the same treatment (some
libraries reset the warnings registry per call, which defeats Python's own once-only rule).
qpipe's own messages are never filtered.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

_DECIDED = "_qpipe_first_copy"  # the verdict rides on the record: one per record, not per handler


class RepeatFilter(logging.Filter):
    """Passes the first copy of each library warning (logger, level, text); counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    def seen(self, source: str, text: str) -> bool:
        """Count one occurrence; True when it is the first."""
        self.counts[(source, text)] += 1
        return self.counts[(source, text)] == 1

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = getattr(record, _DECIDED, None)
        if verdict is None:
            own = record.name == "qpipe" or record.name.startswith("qpipe.")
            verdict = own or record.levelno < logging.WARNING
            verdict = verdict or self.seen(record.name, record.getMessage())
            setattr(record, _DECIDED, verdict)
        return verdict

    def repeated(self) -> list[tuple[str, str, int]]:
        """(source, text, extra copies) of every message that came more than once."""
        return [(src, text, n - 1) for (src, text), n in self.counts.items() if n > 1]


@contextmanager
def once_per_run(report_to: logging.Logger | None = None) -> Iterator[RepeatFilter]:
    """Within the block, each repeating library warning is shown once; at the end one line per
    such message says how many copies were held back."""
    report_to = report_to or logging.getLogger("qpipe")
    repeats = RepeatFilter()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(repeats)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show_once(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
            if repeats.seen(f"py.warnings.{category.__name__}", str(message)):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show_once
        # Warnings no filter decides on come through every time, so all copies are counted.
        warnings.simplefilter("always", append=True)
        try:
            yield repeats
        finally:
            for handler in handlers:
                handler.removeFilter(repeats)
            for source, text, extra in repeats.repeated():
                report_to.warning(
                    "%s: %s (shown once; %d more copies held back)",
                    source,
                    text[:300],
                    extra,
                )
