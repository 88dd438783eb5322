"""The run folder's own record of a run: everything the runner logs to MLflow is also written
to ``<run_dir>/run.json`` (and the logged texts under ``<run_dir>/logged/``), so that a tracking
server that dies mid-run loses nothing. ``python -m qpipe.sync <run_dir>`` pushes the record to
MLflow later.

``JournaledTracker`` puts the record in front of the MLflow tracker: each call is written to the
record first, then sent; the first failure of the server after the run opened turns sending off
for the rest of the run (one warning line, no retries for minutes), and the pipeline goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("qpipe")

RECORD = "run.json"
LOGGED = "logged"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _short_reason(err: Exception) -> str:
    """The gist of a tracking failure: the transport's own words are a paragraph long."""
    text = " ".join(str(err).split())
    gists = (
        "Connection refused",
        "Max retries exceeded",
        "timed out",
        "No space left",
        # a local sqlite store (qpipe.tracking.store_check)
        "readonly database",
        "database or disk is full",
        "database is locked",
        "disk I/O error",
        "file is not a database",
        "malformed",
    )
    for gist in gists:
        if gist in text:
            return f"{type(err).__name__}: {gist}"
    return f"{type(err).__name__}: {text[:120]}"


def tracking_place(uri: str) -> str:
    """``at http://host:5000`` or ``store /path/mlflow.db``: where the run was logging."""
    prefix = "sqlite:///"
    return f"store {uri[len(prefix) :]}" if uri.startswith(prefix) else f"at {uri}"


def tracking_stopped(uri: str) -> str:
    return "stopped taking writes" if uri.startswith("sqlite:") else "stopped answering"


class RunJournal:
    """``<run_dir>/run.json``, rewritten atomically after every change."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORD
        self.data: dict[str, Any] = {
            "run_id": None,
            "run_name": None,
            "tracking_uri": None,
            "experiment": None,
            "status": "RUNNING",
            "start_time_ms": int(time.time() * 1000),
            "end_time_ms": None,
            "tags": {},
            "params": {},
            "metrics": {},
            "texts": [],  # artifact files logged from text, kept under logged/
            "artifacts": [],  # [local path, artifact folder or null]
            "tracking_offline": None,
            "synced": [],
        }

    @classmethod
    def read(cls, run_dir: Path) -> RunJournal:
        journal = cls(run_dir)
        journal.data = json.loads(journal.path.read_text())
        return journal

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(RECORD + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def text_file(self, artifact_file: str) -> Path:
        return self.run_dir / LOGGED / artifact_file

    def write_text(self, text: str, artifact_file: str) -> None:
        path = self.text_file(artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if artifact_file not in self.data["texts"]:
            self.data["texts"].append(artifact_file)
        self.save()


class JournaledTracker:
    """The runner's tracker: the record first, then MLflow while it answers."""

    def __init__(self, tracker: Any, journal: RunJournal) -> None:
        self.tracker = tracker
        self.journal = journal
        self.offline: str | None = None  # why MLflow stopped being written, once it did
        journal.data.update(tracking_uri=tracker.tracking_uri)

    def __getattr__(self, name: str) -> Any:  # anything the runner does not journal
        return getattr(self.tracker, name)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def _send(self, what: str, call: Any, *args: Any) -> None:
        if self.offline is not None:
            return
        try:
            call(*args)
        except Exception as err:  # the server died, a disk filled: keep going, keep the record
            reason = _short_reason(err)
            self.offline = f"{what} failed: {reason}"
            self.journal.data["tracking_offline"] = {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "stage": self.journal.data["tags"].get("qpipe.stage"),
                "reason": self.offline,
            }
            self.journal.save()
            uri = self.tracker.tracking_uri
            log.warning(
                "MLflow %s %s (%s); the run goes on and keeps its results in %s",
                tracking_place(uri),
                tracking_stopped(uri),
                reason[:120],
                self.journal.path,
            )

    def start(self, run_name: str, tags: dict[str, str]) -> str:
        # Not guarded: a server that is down when the run opens is the caller's to report.
        run_id = self.tracker.start(run_name, tags)
        self.journal.data.update(
            run_id=run_id,
            run_name=run_name,
            experiment=getattr(self.tracker, "experiment", None),
        )
        self.journal.data["tags"].update(_jsonable(tags))
        self.journal.save()
        return run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.journal.data["params"].update(_jsonable(params))
        self.journal.save()
        self._send("log_params", self.tracker.log_params, params)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.journal.data["metrics"].update(_jsonable(metrics))
        self.journal.save()
        self._send("log_metrics", self.tracker.log_metrics, metrics)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.journal.write_text(json.dumps(data, indent=2, default=str), artifact_file)
        self._send("log_json", self.tracker.log_json, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.journal.write_text(text, artifact_file)
        self._send("log_text", self.tracker.log_text, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        entry = [str(Path(path).resolve()), artifact_path]
        if entry not in self.journal.data["artifacts"]:
            self.journal.data["artifacts"].append(entry)
            self.journal.save()
        self._send("log_artifact", self.tracker.log_artifact, path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.journal.data["tags"].update(_jsonable(tags))
        self.journal.save()
        self._send("set_tags", self.tracker.set_tags, tags)

    def end(self, status: str) -> None:
        self.journal.data.update(status=status, end_time_ms=int(time.time() * 1000))
        self.journal.save()
        if self.offline is None:
            self._send("end", self.tracker.end, status)
            return
        # Once more even when offline: mlflow.end_run pops the active run before it calls the
        # server, and a sweep's next job must not inherit this one.
        with contextlib.suppress(Exception):
            self.tracker.end(status)

    def ui_hint(self) -> str:
        return self.tracker.ui_hint()
