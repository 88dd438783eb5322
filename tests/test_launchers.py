"""Sweeps in parallel: GPU slots held by real processes (flock), the joblib and submitit_local
launchers running real jobs, and parallel writers on one sqlite MLflow store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from qpipe.config.compose import CONF_DIR
from qpipe.devices.gpu_slots import claim, parallel_jobs, visible_gpus

ROOT = Path(__file__).resolve().parents[1]

_JOB = textwrap.dedent(
    """
    import json, sys, time
    from qpipe.devices.gpu_slots import claim
    slot = claim(int(sys.argv[1]), poll_s=0.05)
    start = time.time()
    time.sleep(float(sys.argv[2]))
    print(json.dumps({"gpus": slot.gpus, "start": start, "end": time.time()}))
    """
)


def _env(tmp_path: Path, gpus: str) -> dict[str, str]:
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": gpus,
        "QPIPE_GPU_LOCKS": str(tmp_path / "locks"),
        "PYTHONPATH": str(ROOT),
    }


def _jobs(tmp_path: Path, n: int, gpus: str, per_job: int, seconds: float) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _JOB, str(per_job), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(tmp_path, gpus),
        )
        for _ in range(n)
    ]
    return [json.loads(p.communicate(timeout=60)[0]) for p in procs]


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_four_jobs_on_two_gpus_queue_and_never_share_a_gpu(tmp_path) -> None:
    runs = _jobs(tmp_path, 4, "0,1", 1, 1.0)
    by_gpu: dict[tuple, list[dict]] = {}
    for run in runs:
        by_gpu.setdefault(tuple(run["gpus"]), []).append(run)
    assert sorted(by_gpu) == [("0",), ("1",)]
    for held in by_gpu.values():
        assert len(held) == 2
        assert not _overlap(*held)  # the second job on a GPU waited for the first
    # ...while the two GPUs worked at the same time.
    assert any(_overlap(a, b) for a in by_gpu[("0",)] for b in by_gpu[("1",)])


def test_jobs_of_two_gpus_take_aligned_pairs(tmp_path) -> None:
    runs = _jobs(tmp_path, 3, "4,5,6,7", 2, 0.5)
    assert {tuple(r["gpus"]) for r in runs} == {("4", "5"), ("6", "7")}


def test_a_killed_job_frees_its_gpu(tmp_path) -> None:
    env = _env(tmp_path, "0,1")
    holders = [
        subprocess.Popen([sys.executable, "-c", _JOB, "1", "60"], env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    locks = tmp_path / "locks"
    deadline = time.time() + 30
    while time.time() < deadline:  # both GPUs held: each lock file names its holder
        held = [p.read_text().strip() for p in locks.glob("gpu-*.lock")] if locks.exists() else []
        if len([h for h in held if h]) == 2:
            break
        time.sleep(0.05)
    os.kill(holders[0].pid, signal.SIGKILL)
    runs = _jobs(tmp_path, 1, "0,1", 1, 0.1)
    holders[1].kill()
    for p in holders:
        p.wait()
    assert runs[0]["gpus"] in (["0"], ["1"])


def test_no_gpus_no_pinning(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and claim(1) is None and parallel_jobs(1) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert parallel_jobs(1) == 4 and parallel_jobs(2) == 2


def test_launcher_configs_carry_qpipes_defaults() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.timeout_min == 240


def _sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QPIPE_OUTPUTS": str(tmp_path / "out"), "COLUMNS": "200"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "qpipe", "--multirun", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )


def _runs(tmp_path: Path, experiment: str):
    """The jobs' runs (the sweep's parent run, made in the launching process, left out)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[experiment])
    if "tags.qpipe.role" in runs:
        runs = runs[runs["tags.qpipe.role"] != "parent"].reset_index(drop=True)
    return runs


def _integrity(tmp_path: Path) -> str:
    with sqlite3.connect(tmp_path / "out" / "mlflow.db") as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.slow
def test_submitit_local_runs_the_sweep_in_its_own_processes(tmp_path) -> None:
    proc = _sweep(
        tmp_path,
        "hydra/launcher=submitit_local",
        "model=tiny_llama",
        "pipeline=estimate",
        "quant=none,bnb_nf4",
        "mlflow.experiment=submitit",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _runs(tmp_path, "submitit")
    assert sorted(runs["params.quant"]) == ["bnb_nf4", "none"]
    assert set(runs["status"]) == {"FINISHED"}
    # submitit ran each job as its own process and kept its logs.
    logs = list((tmp_path / "out" / "multirun").rglob(".submitit/*/*_0_log.out"))
    assert len(logs) == 2
    assert _integrity(tmp_path) == "ok"


@pytest.mark.slow
def test_joblib_sweep_of_four_jobs_shares_one_baseline_on_a_fresh_outputs_folder(
    tmp_path,
) -> None:
    # A fresh outputs folder: the four workers race to create the store and the experiment,
    # and to compute the baseline (and the model folder, the tokenizer) all four need.
    dag = tmp_path / "baseline.yaml"
    dag.write_text(
        "name: estimate_baseline\nstages:\n  env_check: {}\n"
        "  memory_budget: {needs: [env_check]}\n"
        "  baseline: {needs: [memory_budget], cache: [model, eval, dtype, device, seed]}\n"
    )
    proc = _sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        *_TINY_EVAL,
        f"pipeline={dag}",
        "quant=none,bnb_nf4,bnb_int8,rtn",
        "mlflow.experiment=joblib",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "n_jobs=4" in proc.stdout + proc.stderr
    runs = _runs(tmp_path, "joblib")
    assert sorted(runs["params.quant"]) == ["bnb_int8", "bnb_nf4", "none", "rtn"]
    assert set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["params.cache.baseline"]) == ["hit", "hit", "hit", "miss"]
    entries = _cache_entries(tmp_path / "out")
    assert all(len(names) == 1 for names in entries.values()), entries
    assert _integrity(tmp_path) == "ok"


def test_a_job_is_pinned_through_cuda_visible_devices(tmp_path) -> None:
    """Before CUDA starts, the pin narrows CUDA_VISIBLE_DEVICES to the job's GPU and points
    ``device`` at it; a ``device=cpu`` job is left alone."""
    code = textwrap.dedent(
        """
        import json, os
        from omegaconf import OmegaConf
        from qpipe.devices.gpu_slots import pin_job
        cpu = OmegaConf.create({"device": "cpu", "placement": {"gpus_per_job": 1}})
        cfg = OmegaConf.create({"device": "auto", "placement": {"gpus_per_job": 1}})
        print(json.dumps({"cpu": pin_job(cpu), "tags": pin_job(cfg), "device": cfg.device,
                          "visible": os.environ["CUDA_VISIBLE_DEVICES"]}))
        """
    )
    env = _env(tmp_path, "3,5")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    result = json.loads(out.stdout)
    assert result["cpu"] == {}
    assert result["tags"] == {"qpipe.gpus": "3"} and result["visible"] == "3"
    assert result["device"] == "cuda"


# -- caches shared by processes running at once (qpipe.store.entry) ---------------------

# The cached stages of the default DAG, cheap: baseline perplexity, an RTN checkpoint, loaded.
_SHARED_DAG = """name: shared_caches
stages:
  env_check: {}
  memory_budget: {needs: [env_check]}
  exclude_layers: {needs: [memory_budget]}
  pad_align: {needs: [exclude_layers]}
  baseline:
    needs: [memory_budget]
    cache: [model, eval, dtype, device, seed]
  quantize:
    needs: [memory_budget, pad_align]
    cache: [model, quant, calib, exclude, pad_align, seed, dtype, device]
  load: {needs: [quantize]}
"""
_TINY_EVAL = (
    "model=tiny_llama",
    "eval=quick",
    "eval.max_tokens=32",
    "eval.window=32",
    "eval.extra_texts=null",
    "eval.prompts=null",
    "eval.quality_on_random=true",  # these tests are about the baseline's cache entry
)


def _cache_entries(out: Path) -> dict[str, list[str]]:
    """Every cache folder's entries (lock files aside), partial and stale ones included."""
    cache = out / "cache"
    folders = [cache / "models", cache / "tokenizers", *sorted((cache / "stages").iterdir())]
    return {
        f.name: sorted(p.name for p in f.iterdir() if p.suffix != ".lock")
        for f in folders
        if f.is_dir()
    }


@pytest.mark.slow
def test_four_identical_runs_at_once_all_finish_with_one_cache_entry_each(tmp_path) -> None:
    """The same command started four times at the same moment on a fresh outputs folder: one
    process makes each cache entry (model folder, tokenizer, baseline, checkpoint), the others
    wait for it and reuse it; all four FINISH."""
    dag = tmp_path / "shared.yaml"
    dag.write_text(_SHARED_DAG)
    out = tmp_path / "out"
    env = {**os.environ, "QPIPE_OUTPUTS": str(out), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    args = [*_TINY_EVAL, "quant=rtn", f"pipeline={dag}", "mlflow.experiment=four"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qpipe", *args, f"hydra.run.dir={tmp_path / f'run{i}'}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, text in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, text[-3000:]
    runs = _runs(tmp_path, "four")
    assert list(runs["status"]) == ["FINISHED"] * 4
    # Each result was computed once and reused three times: the others waited for it.
    for stage in ("baseline", "quantize"):
        assert sorted(runs[f"params.cache.{stage}"]) == ["hit", "hit", "hit", "miss"]
    entries = _cache_entries(out)
    assert all(len(names) == 1 for names in entries.values()), entries
    assert {"models", "tokenizers", "baseline", "quantize"} <= set(entries)
    from qpipe.runner import Runner

    for stage in ("baseline", "quantize"):  # whole: every file matches its manifest
        assert Runner._load_cached(out / "cache" / "stages" / stage / entries[stage][0])
    assert _integrity(tmp_path) == "ok"
