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


@pytest.fixture(scope="session", autouse=True)
def outputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("QPIPE_TEST_OUTPUTS") or tmp_path_factory.mktemp("outputs"))
    os.environ["QPIPE_OUTPUTS"] = str(path)
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
