"""Runs whose process died without closing them (SIGKILL, the OOM killer, a power loss) would
stay RUNNING in MLflow forever. Each run records the host and process that runs it; the next
qpipe start on that host marks the ones whose process is gone KILLED, with the stage they
were in."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

import psutil

from qpipe.tracking.journal import RECORD, RunJournal

log = logging.getLogger("qpipe")

HOST, PID, PID_STARTED = "qpipe.host", "qpipe.pid", "qpipe.pid_started"


def owner_tags() -> dict[str, str]:
    """Tags that say which process runs this run."""
    return {
        HOST: socket.gethostname(),
        PID: str(os.getpid()),
        PID_STARTED: f"{psutil.Process().create_time():.2f}",
    }


def alive(pid: int, started: str) -> bool:
    try:
        return f"{psutil.Process(pid).create_time():.2f}" == started
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def close_dead_runs(tracking_uri: str) -> list[str]:
    """Mark KILLED every RUNNING run of this host whose process has ended; return their ids."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return []
    host = socket.gethostname()
    runs = client.search_runs(
        experiments,
        f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        tags = run.data.tags
        if PID not in tags or alive(int(tags[PID]), tags.get(PID_STARTED, "")):
            continue
        stage = tags.get("qpipe.stage", "?")
        what = f"during {stage}" if tags.get("qpipe.role") != "parent" else "its sweep"
        reason = (
            f"the process (pid {tags[PID]}) ended {what} without closing the run "
            "(SIGKILL, the OOM killer or a power loss); marked by the next qpipe start"
        )
        client.set_tag(run.info.run_id, "qpipe.failed_stage", stage)
        client.set_tag(run.info.run_id, "qpipe.failure", reason)
        client.set_terminated(run.info.run_id, "KILLED")
        run_dir = tags.get("qpipe.run_dir")
        if run_dir and (Path(run_dir) / RECORD).is_file():
            with contextlib.suppress(OSError, ValueError):
                journal = RunJournal.read(Path(run_dir))
                journal.data["status"] = "KILLED"
                journal.data["tags"].update({"qpipe.failed_stage": stage, "qpipe.failure": reason})
                journal.save()
        log.warning(
            "run %s (%s) was left RUNNING by a killed process: marked KILLED",
            run.info.run_id,
            stage,
        )
        closed.append(run.info.run_id)
    return closed
