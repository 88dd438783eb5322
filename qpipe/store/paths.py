"""Where qpipe keeps what it makes: everything under one ``outputs/`` folder, never the cwd."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def outputs_root() -> Path:
    """The outputs folder: ``$QPIPE_OUTPUTS`` or ``./outputs``, made absolute once."""
    # realpath, not Path.resolve: a symbolic link loop there raises RuntimeError on 3.11; the
    # check below then names it in one line.
    return Path(os.path.realpath(os.environ.get("QPIPE_OUTPUTS", "outputs")))


def check_outputs_root() -> None:
    """ConfigError (one line) when the outputs folder cannot be made or written in. Checked
    first, before matplotlib, Triton or TorchInductor try to make their caches there (their
    failure is a long traceback from an import)."""
    from qpipe.errors import ConfigError

    given = os.environ.get("QPIPE_OUTPUTS")
    name = f"QPIPE_OUTPUTS={given!r}" if given is not None else "the outputs folder ./outputs"
    root = outputs_root()
    try:
        (root / "cache").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root / "cache", prefix=".write-probe-"):
            pass
    except OSError as err:
        why = unwritable_reason(err, root / "cache", root)
        raise ConfigError(
            f"{name} cannot be qpipe's outputs folder ({why}); point QPIPE_OUTPUTS at a folder "
            "qpipe may create and write in"
        ) from None


def unwritable_reason(err: OSError, path: Path, fallback: Path | str) -> str:
    """Why ``path`` could not be made or written, in a few words: a file standing where a
    folder must be (the usual cause), else the OS's own reason."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is a file, not a folder"
    return f"{err.strerror or err}: {err.filename or fallback}"


def cache_dir(*parts: str) -> Path:
    """A folder under ``outputs/cache`` (created)."""
    path = outputs_root().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_file(name: str) -> Path:
    """A text shipped with qpipe (``qpipe/data``)."""
    return Path(__file__).parents[1] / "data" / name


# Libraries that keep caches in the home folder or /tmp by default; a run puts them under
# outputs/cache instead, so that qpipe writes only under its outputs folder (the Hugging Face
# hub cache of downloaded weights stays shared: HF_HOME moves it).
LIBRARY_CACHES = {
    "MPLCONFIGDIR": "matplotlib",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "HF_MODULES_CACHE": "hf_modules",
}


# Compiled work kept on disk between runs (unless the user set these): TorchInductor's FX graph
# cache and AOTAutograd's cache (under TORCHINDUCTOR_CACHE_DIR) hold the compiled decode step,
# Triton's cache (TRITON_CACHE_DIR) every compiled kernel. Each library keys its entries by
# what they depend on (the graph, torch/Triton/CUDA versions, the GPU) and writes them
# atomically, so runs and a sweep's jobs share them safely.
COMPILE_CACHES_ON = {
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
}


def contain_library_caches() -> None:
    """Point the libraries' caches under ``outputs/cache`` unless the user chose a place, and
    keep compiled work there. Call before those libraries are imported: some read the
    variable once, at import."""
    for variable, name in LIBRARY_CACHES.items():
        os.environ.setdefault(variable, str(outputs_root() / "cache" / name))
    for variable, value in COMPILE_CACHES_ON.items():
        os.environ.setdefault(variable, value)
