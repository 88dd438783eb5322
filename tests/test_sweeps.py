"""Sweeps for real, through the CLI: the MLflow parent run with nested children, its comparison
files and Pareto plot, presets, failing jobs that fail the command, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from qpipe.plots.pareto import Point, pareto_front
from qpipe.report import PARENT_ROLE

ROOT = Path(__file__).resolve().parents[1]
# The smallest pipeline that still quantizes, loads, measures and scores (a few seconds a job).
SMALL_EVAL = (
    "model=tiny_llama",
    "eval=quick",
    "eval.max_tokens=128",
    "eval.window=64",
    "eval.prefill_tokens=16",
    "eval.max_new_tokens=2",
    "workload.context_len=128",
    # tiny_llama at a quarter of its width and half its depth: these tests are about the
    # sweep (parent, children, files, resume), not the model; a job takes 4-8 s, not 10-25.
    "model.config.hidden_size=64",
    "model.config.intermediate_size=128",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.config.head_dim=32",
)


def qpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qpipe", *args]


def env(outputs: Path) -> dict[str, str]:
    return {**os.environ, "QPIPE_OUTPUTS": str(outputs), "COLUMNS": "250", "MPLBACKEND": "Agg"}


def client(outputs: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")


def runs_of(outputs: Path, experiment: str) -> tuple[list, list]:
    """(parents, children) of an experiment, deleted runs left out."""
    c = client(outputs)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return [], []
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("qpipe.role") == PARENT_ROLE]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_pareto_front_keeps_what_nothing_beats_on_both_axes() -> None:
    pts = [
        Point("fp32", 0.54, 0.0),
        Point("int8", 0.22, 1.8),
        Point("nf4", 0.17, 34.1),
        Point("gptq", 0.17, 5.9),
        Point("rtn", 0.18, 28.7),  # more memory and more loss than gptq
    ]
    assert [pts[i].label for i in pareto_front(pts)] == ["gptq", "int8", "fp32"]


def test_failing_jobs_run_the_rest_and_fail_the_command(tmp_path: Path) -> None:
    """Issue 12: `--multirun ... quant.bits=5,4` printed the error, ran the other job, exited 0."""
    proc = subprocess.run(
        qpipe_cmd(
            "--multirun",
            "model=tiny_llama",
            "pipeline=estimate",
            "quant=rtn",
            "quant.bits=5,4",
            "mlflow.experiment=failing",
        ),
        capture_output=True,
        text=True,
        env=env(tmp_path),
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "1 of 2 jobs failed" in out
    assert "#0 model=tiny_llama pipeline=estimate quant=rtn quant.bits=5" in out
    assert "quant.bits=5 is not valid for rtn; use 2, 3, 4 or 8" in out
    assert "Traceback" not in out
    parents, children = runs_of(tmp_path, "failing")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    status = sorted(r.info.status for r in children)
    assert status == ["FAILED", "FINISHED"]  # the bad job is listed in the parent too
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "quant.bits=5 is not valid" in failed.data.tags["qpipe.failure"]
    # Issue 24: the parent says what was swept; the sweep ends with how to look at it.
    parent = parents[0]
    assert parent.info.run_name.startswith("sweep quant.bits=5,4 (")
    assert parent.data.params["sweep.quant.bits"] == "5,4"
    assert parent.data.params["sweep.jobs"] == "2"
    assert parent.data.tags["qpipe.sweep_axes"] == "quant.bits=5,4"
    exp = client(tmp_path).get_experiment_by_name("failing")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs
    last = [line.strip() for line in proc.stdout.splitlines() if line.strip()][-2:]
    assert last[0].startswith("mlflow ui --backend-store-uri sqlite:///")
    assert last[1] == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"


@pytest.mark.slow
def test_bits_sweep_survives_sigkill_and_resumes_without_recomputing(tmp_path: Path) -> None:
    """`+sweep=bits quant=rtn`: 2/3/4/8-bit RTN as children of one parent. Killed with SIGKILL
    while a job runs, the same command again skips the finished jobs, redoes the killed one
    from scratch and leaves one child per job, a comparison table and a Pareto plot."""
    args = ("+sweep=bits", "quant=rtn", *SMALL_EVAL, "mlflow.experiment=bits")
    proc = subprocess.Popen(
        qpipe_cmd(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(tmp_path),
        start_new_session=True,
    )
    # Watch the job logs, not the MLflow store: opening the store while the sweep creates it
    # would race its schema migration.
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            assert proc.poll() is None, "the sweep ended before it could be killed"
            logs = sorted((tmp_path / "multirun").glob("*/*/*/qpipe.log"))
            done = [log for log in logs if "✔ benchmark" in log.read_text()]
            if len(done) >= 2 and len(logs) >= 3 and "▶" in logs[-1].read_text():
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    _, children = runs_of(tmp_path, "bits")
    finished_before_kill = sum(r.info.status == "FINISHED" for r in children)
    assert finished_before_kill >= 1

    again = subprocess.run(
        qpipe_cmd(*args), capture_output=True, text=True, env=env(tmp_path), timeout=900
    )
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert out.count("of this sweep: not rerun") == finished_before_kill
    parents, children = runs_of(tmp_path, "bits")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["qpipe.job_key"] for r in children}) == 4
    assert sorted(r.data.params["quant.bits"] for r in children) == ["2", "3", "4", "8"]
    assert {r.data.params["kernel"] for r in children} == {"torch"}
    parent = parents[0]
    assert parent.data.metrics["sweep.jobs_finished"] == 4
    files = {a.path for a in client(tmp_path).list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison.html", "pareto.png"} <= files
    table = client(tmp_path).download_artifacts(parent.info.run_id, "comparison.md", str(tmp_path))
    assert Path(table).read_text().count("| FINISHED |") == 4
    png = client(tmp_path).download_artifacts(parent.info.run_id, "pareto.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The killed job's half-written state is never taken for a result.
    assert not list((tmp_path / "cache").rglob("*.partial"))
    # The width shows in the memory the loaded weights take.
    by_bits = {int(r.data.params["quant.bits"]): r.data.metrics for r in children}
    assert by_bits[2]["mem.loaded_weights_gb"] < by_bits[8]["mem.loaded_weights_gb"]

    report = subprocess.run(
        [sys.executable, "-m", "qpipe.report", "--experiment", "bits", "--out", "cmp/bits"],
        capture_output=True,
        text=True,
        env=env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    # The terminal table is as wide as the terminal; the CSV holds every column whole.
    assert (tmp_path / "cmp" / "bits.png").is_file() and (tmp_path / "cmp" / "bits.csv").is_file()
    table = (tmp_path / "cmp" / "bits.csv").read_text()
    for width in (2, 3, 4, 8):
        assert f"tiny-llama/rtn-w{width}" in table


@pytest.mark.slow
def test_backends_preset_gives_one_parent_with_a_child_per_backend(tmp_path: Path) -> None:
    args = ("+sweep=backends", "calib=tiny", *SMALL_EVAL, "mlflow.experiment=backends")
    proc = subprocess.run(
        qpipe_cmd(*args), capture_output=True, text=True, env=env(tmp_path), timeout=1500
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    parents, children = runs_of(tmp_path, "backends")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["quant"] for r in children) == sorted(
        ["none", "bnb_nf4", "bnb_int8", "rtn", "gptq", "awq", "fp8"]
    )
    assert {r.info.status for r in children} == {"FINISHED"}
    files = {a.path for a in client(tmp_path).list_artifacts(parents[0].info.run_id)}
    assert "pareto.png" in files and "comparison.csv" in files
