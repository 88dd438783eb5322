"""Where qpipe keeps what it makes: everything under one ``outputs/`` folder, never the cwd."""

from __future__ import annotations

import os
from pathlib import Path


def outputs_root() -> Path:
    """The outputs folder: ``$QPIPE_OUTPUTS`` or ``./outputs``, made absolute once."""
    return Path(os.environ.get("QPIPE_OUTPUTS", "outputs")).resolve()


def cache_dir(*parts: str) -> Path:
    """A folder under ``outputs/cache`` (created)."""
    path = outputs_root().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_file(name: str) -> Path:
    """A text shipped with qpipe (``qpipe/data``)."""
    return Path(__file__).parent / "data" / name
