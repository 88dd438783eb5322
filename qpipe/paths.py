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


# Libraries that keep caches in the home folder or /tmp by default; a run puts them under
# outputs/cache instead, so that qpipe writes only under its outputs folder (the Hugging Face
# hub cache of downloaded weights stays shared: HF_HOME moves it).
LIBRARY_CACHES = {
    "MPLCONFIGDIR": "matplotlib",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "HF_MODULES_CACHE": "hf_modules",
}


def contain_library_caches() -> None:
    """Point the libraries' caches under ``outputs/cache`` unless the user chose a place.
    Call before those libraries are imported: some read the variable once, at import."""
    for variable, name in LIBRARY_CACHES.items():
        os.environ.setdefault(variable, str(outputs_root() / "cache" / name))
