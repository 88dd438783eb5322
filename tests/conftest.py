"""Shared test setup: one outputs folder per test session (so the dequantised SmolLM2 and
the MLflow store are made once), and the Hydra compose helper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from qpipe.config.compose import CONF_DIR, normalize_overrides


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker (and every process it starts) takes its share of the
    cores: torch's thread pools, each sized for the whole machine, spin against each other
    and make every matmul several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


_share_the_cores()


def random_llama(**config: object):
    """A Llama with seeded random fp32 weights, in eval mode; ``config`` picks its shapes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32).eval()


def save_random_llama(path: Path, **config: object) -> Path:
    """``random_llama`` saved as a Hugging Face folder: tests pick the shapes (widths that
    are or are not multiples of 128) through ``config``."""
    random_llama(**config).save_pretrained(path)
    return path


# The files that run real models end to end, started first: with a worker per core
# (pytest-xdist, --dist loadfile) the long ones then overlap instead of ending the run alone.
_LONG_FILES = (
    "test_llmc_backends.py",
    "test_auto_smollm2.py",
    "test_pipeline.py",
    "test_sweeps.py",
    "test_launchers.py",
    "test_faults.py",
    "test_fault_families.py",
    "test_user_pipelines.py",
    "test_sensitivity.py",
    "test_compile.py",
    "test_tracking_server.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


@pytest.fixture(scope="session", autouse=True)
def outputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("QPIPE_TEST_OUTPUTS") or tmp_path_factory.mktemp("outputs"))
    os.environ["QPIPE_OUTPUTS"] = str(path)
    if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("QPIPE_TEST_OUTPUTS"):
        # The workers share one model cache (SmolLM2 dequantized from its GGUF once, not once
        # a worker): cache entries are safe with several writers (qpipe.store.entry).
        shared = tmp_path_factory.getbasetemp().parent / "models"
        shared.mkdir(exist_ok=True)
        (path / "cache").mkdir(parents=True, exist_ok=True)
        (path / "cache" / "models").symlink_to(shared, target_is_directory=True)
    return path


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python -m qpipe <overrides>`` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)))


def run_interpreted(test_file: str, flag: str, timeout: int = 900) -> str:
    """Run ``python test_file flag`` with Triton's CPU interpreter on (it must be switched on
    before triton is imported, hence a child process); its stdout. Fails the test with the
    child's stderr if it fails."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, test_file, flag],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def cli_in_process(*args: str) -> tuple[int, str]:
    """``python -m qpipe args`` through its real entry point, in this process (no interpreter
    start, no second import of torch/transformers/mlflow): its exit code and what it printed.
    For tests not about the process itself; the caller sets the environment and the working
    directory (monkeypatch)."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from qpipe.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["qpipe", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # a crash through the entry point counts as a traceback
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
    return code, out.getvalue() + err.getvalue()
