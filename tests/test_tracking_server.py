"""A real ``mlflow server`` on localhost (sqlite backend, local artifact root): a run and a sweep
logged to it over HTTP and read back through MLflow's client; an unreachable server found in
seconds, with one line, or logged around with ``mlflow.fallback=local``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from qpipe.errors import QpipeError
from qpipe.tracking.uri import resolve_tracking_uri, unreachable_reason
from tests.conftest import cli_in_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("w"),
        cwd=root,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up in 180 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def qpipe(outputs: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """``python -m qpipe args`` with its own outputs folder, in this process: these tests are
    about where the runs are logged, not about the process."""
    monkeypatch.setenv("QPIPE_OUTPUTS", str(outputs))
    monkeypatch.setenv("COLUMNS", "250")
    return cli_in_process(*args)


@pytest.mark.slow
def test_a_run_and_a_sweep_logged_to_a_real_server(
    server: str, tmp_path: Path, monkeypatch
) -> None:
    code, out = qpipe(
        tmp_path,
        monkeypatch,
        "model=tiny_llama",
        "pipeline=estimate",
        f"mlflow.tracking_uri={server}",
        "mlflow.experiment=over-http",
    )
    assert code == 0, out[-3000:]
    assert f"open {server}" in out
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local store
    client = MlflowClient(server)
    exp = client.get_experiment_by_name("over-http")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "tiny-llama"
    assert run.data.metrics["mem.est_weights_gb"] > 0
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "tiny-llama" in Path(config).read_text()
    assert "artifacts/memory_breakdown.png" in {
        a.path for a in client.list_artifacts(run.info.run_id, "artifacts")
    }

    code, out = qpipe(
        tmp_path,
        monkeypatch,
        "--multirun",
        "model=tiny_llama",
        "pipeline=estimate",
        "quant=none,rtn",
        f"mlflow.tracking_uri={server}",
        "mlflow.experiment=sweep-over-http",
    )
    assert code == 0, out[-3000:]
    exp = client.get_experiment_by_name("sweep-over-http")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("qpipe.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison.html", "pareto.png"} <= files


def test_unreachable_server_is_found_in_seconds(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    assert "refused" in (unreachable_reason(uri) or "")
    with pytest.raises(QpipeError) as err:
        resolve_tracking_uri({"tracking_uri": uri, "fallback": None})
    assert time.perf_counter() - start < 5
    assert f"mlflow.tracking_uri={uri} is unreachable" in str(err.value)
    assert "mlflow.fallback=local" in str(err.value) and "\n" not in str(err.value)
    # An address where nothing answers costs at most the probe's timeout (where a network
    # proxy answers for it instead, its answer is not a tracking server's either).
    start = time.perf_counter()
    assert unreachable_reason("http://10.255.255.1:5000", timeout=2.0) is not None
    assert time.perf_counter() - start < 4


def test_cli_unreachable_server_is_one_line_or_falls_back(tmp_path: Path, monkeypatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    args = ("model=tiny_llama", "pipeline=estimate", f"mlflow.tracking_uri={uri}")
    start = time.perf_counter()
    code, out = qpipe(tmp_path, monkeypatch, *args, "mlflow.experiment=down")
    assert code == 2, out[-3000:]
    assert time.perf_counter() - start < 60  # compose + the probe (< 5 s), no weights
    lines = [line for line in out.splitlines() if uri in line]
    assert len(lines) == 1 and lines[0].startswith(f"error: mlflow.tracking_uri={uri}")
    assert "Traceback" not in out

    code, out = qpipe(
        tmp_path, monkeypatch, *args, "mlflow.fallback=local", "mlflow.experiment=fallback"
    )
    assert code == 0, out[-3000:]
    flat = " ".join(out.split())  # the console wraps long lines
    assert "is unreachable" in flat and "(mlflow.fallback=local)" in flat
    local = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = local.get_experiment_by_name("fallback")
    assert [r.info.status for r in local.search_runs([exp.experiment_id])] == ["FINISHED"]
