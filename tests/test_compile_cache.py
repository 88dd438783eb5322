"""Compiled work kept under outputs/cache for the next run and a sweep's jobs: the 4-bit
tuner's choices (keyed by kernel source, versions, device and shape), TorchInductor's and
Triton's caches switched on before torch is imported, and what a warm run reports it saved."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpipe.backends import get_backend
from qpipe.config.settings import resolve_settings
from qpipe.kernels import tuning
from qpipe.kernels.triton_w4a16 import KernelConfig
from qpipe.stages._warmup import Snapshot, cache_metrics, warmup_key
from qpipe.store.records import read_json, update_json
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def outputs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QPIPE_OUTPUTS", str(tmp_path))
    monkeypatch.delenv("QPIPE_TUNE_CACHE", raising=False)
    return tmp_path


def test_tuning_choices_persist_and_are_reused(outputs) -> None:
    path = tuning.tuning_file()
    assert path.parent == outputs / "cache" / "kernel_tuning"
    assert tuning.fingerprint() in path.name
    x = torch.zeros(1, 128, dtype=torch.float16)
    qweight = torch.zeros(64, 16, dtype=torch.int32)  # N = 64 rows of K / 8 words
    scales = torch.zeros(2, 64, dtype=torch.float16)  # 2 groups of 64
    key = tuning.Tuner.key(x, 64, 128, 64, False)
    chosen = KernelConfig("gemv", block_n=32, block_k=64, split_k=2, num_warps=2)
    first = tuning.Tuner()
    first.best[key] = chosen
    first._save(key)

    second = tuning.Tuner()  # another process: finds it on disk
    assert second.has_tuned(64, 128) and not second.has_tuned(64, 256)
    assert second.choose(x, qweight, scales, None, 64, None) == chosen
    assert (second.stats.from_disk, second.stats.tuned) == (1, 0)
    assert second.choose(x, qweight, scales, None, 64, None) == chosen
    assert second.stats.from_disk == 1  # counted once per key


def test_a_changed_library_or_kernel_gets_a_fresh_tuning_file(outputs, monkeypatch) -> None:
    before = tuning.tuning_file()
    tuning.fingerprint.cache_clear()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    try:
        assert tuning.tuning_file() != before
        monkeypatch.setattr(tuning, "_FINGERPRINTED", ("tuning.py",))
        tuning.fingerprint.cache_clear()
        assert tuning.tuning_file() != before
    finally:
        tuning.fingerprint.cache_clear()


def _add_keys(path: str, prefix: str) -> None:
    for i in range(25):
        update_json(Path(path), lambda stored, i=i: {**stored, f"{prefix}{i}": i})


def test_concurrent_writers_keep_every_entry(tmp_path) -> None:
    path = tmp_path / "cache" / "kernel_tuning" / "w4a16-x.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_keys, args=(str(path), p)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(read_json(path)) == 50
    assert not list(path.parent.glob(".*.tmp"))  # no half-written file left


def test_a_warm_run_reports_what_the_cache_saved(outputs) -> None:
    cold = Snapshot({"fxgraph_hit": 0, "fxgraph_miss": 3}, tuned=8, from_disk=0, tuning_s=30.0)
    metrics, info = cache_metrics(cold, 50.0, 30.0, "k1", "runs/first")
    assert info["cold"] and "time.cache_saved_s" not in metrics
    assert metrics["time.warmup_s"] == 80.0 and metrics["cache.tuned_shapes_made"] == 8
    warm = Snapshot({"fxgraph_hit": 3, "fxgraph_miss": 0}, tuned=0, from_disk=8, tuning_s=0.0)
    metrics, info = cache_metrics(warm, 12.0, 0.5, "k1", "runs/second")
    assert metrics["time.cold_warmup_s"] == 80.0
    assert metrics["time.cache_saved_s"] == pytest.approx(80.0 - 12.5)
    assert info["cold_run"] == "runs/first"
    # a run of another kernel form finds no cold figure to compare with
    metrics, _ = cache_metrics(warm, 12.0, 0.5, "k2", "runs/third")
    assert "time.cache_saved_s" not in metrics


def test_another_quantizer_of_the_same_form_shares_the_warmup_key() -> None:
    def key(*overrides: str) -> str:
        cfg = compose_config("model=tiny_llama", *overrides)
        return warmup_key(cfg, resolve_settings(cfg, get_backend), "cpu")

    awq = key("quant=awq")
    assert awq == key("quant=rtn")
    assert awq != key("quant=bnb_nf4")
    assert awq != key("quant=awq", "quant.group_size=128")


def test_compile_caches_are_on_and_under_outputs_before_torch_reads_them(tmp_path) -> None:
    code = (
        "from qpipe.store.paths import contain_library_caches; contain_library_caches()\n"
        "import torch._inductor.config as ic, torch._functorch.config as fc\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "import os; print(ic.fx_graph_cache, fc.enable_autograd_cache, cache_dir(),"
        " os.environ['TRITON_CACHE_DIR'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR", "TRITON"))}
    env.update(QPIPE_OUTPUTS=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    graph, autograd, inductor_dir, triton_dir = out.stdout.split()
    assert graph == autograd == "True"
    assert inductor_dir == str(tmp_path / "cache" / "torchinductor")
    assert triton_dir == str(tmp_path / "cache" / "triton")
