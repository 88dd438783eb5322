"""MLflow, behind the few calls the runner makes. Stages never import this."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from qpipe.errors import QpipeError
from qpipe.store.paths import outputs_root
from qpipe.tracking.store_check import check_sqlite_store, store_problem
from qpipe.tracking.store_lock import sqlite_path, store_lock

EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's experiment type, read by its UI
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def default_tracking_uri() -> str:
    """A sqlite store under ``outputs/`` (never ``./mlruns`` in whatever the cwd is)."""
    root = outputs_root()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def short_sqlite_uri(uri: str) -> str:
    """``sqlite:///outputs/mlflow.db`` where the store lies under the current directory (the
    command a user copies, short enough for one line), the URI unchanged otherwise."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    try:
        return prefix + str(Path(uri[len(prefix) :]).relative_to(Path.cwd()))
    except ValueError:
        return uri


class TrackingRefused(QpipeError):
    """MLflow refuses the configured store or experiment."""


STORE_HINT = "use sqlite:///path/to/mlflow.db, http(s)://host:port, or null (outputs/mlflow.db)"


def refusal(uri: str, experiment: str, err: Exception) -> str:
    """MLflow's refusal as one line: its first sentence, the URI, and what would work."""
    text = " ".join(str(err).split()) or type(err).__name__
    first = text.split(". ")[0].rstrip(".")
    if len(first) > 300:
        first = first[:300] + "…"
    return (
        f"MLflow refuses mlflow.tracking_uri={uri} (mlflow.experiment={experiment!r}): "
        f"{type(err).__name__}: {first}; {STORE_HINT}"
    )


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


class Tracker:
    """One MLflow run per pipeline execution."""

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        if self.tracking_uri.startswith(("http://", "https://")):
            # MLflow's defaults retry a dead server for minutes; a run has better things to do
            # (its record stays in the run folder, see qpipe.tracking.journal). The user's settings win.
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
        local = sqlite_path(self.tracking_uri)
        if local is not None:  # read-only, locked, corrupt, full: one line, before MLflow
            check_sqlite_store(local)
        try:
            mlflow.set_tracking_uri(self.tracking_uri)
            with store_lock(self.tracking_uri):  # parallel sweep jobs: one creator at a time
                if mlflow.get_experiment_by_name(experiment) is None:
                    # Artifacts go beside the store, not into ./mlruns of the current directory.
                    location = None
                    if self.tracking_uri.startswith("sqlite:"):
                        location = (outputs_root() / "mlartifacts").as_uri()
                    mlflow.create_experiment(experiment, artifact_location=location)
                found = mlflow.set_experiment(experiment)
                if EXPERIMENT_KIND not in found.tags:
                    # MLflow 3's UI opens an experiment of no kind on its GenAI overview
                    # (traces); qpipe's are runs to compare.
                    mlflow.MlflowClient().set_experiment_tag(
                        found.experiment_id, EXPERIMENT_KIND, "custom_model_development"
                    )
        except QpipeError:
            raise
        except Exception as err:  # MLflow's own refusal (a store it won't open, a bad name)
            problem = store_problem(self.tracking_uri, err)
            raise TrackingRefused(problem or refusal(self.tracking_uri, experiment, err)) from None
        self.run_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str]) -> str:
        run = self._mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        # MLflow caps a param value at 6000 characters; ours are short, but a long list is not.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        if clean:
            self._mlflow.log_metrics(clean)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self._mlflow.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def end(self, status: str) -> None:
        self._mlflow.end_run(status=status)

    def ui_hint(self) -> str:
        return self.hint_for(self.tracking_uri)

    @staticmethod
    def hint_for(tracking_uri: str) -> str:
        """The command (or address) that shows this store's runs."""
        if tracking_uri.startswith(("http://", "https://")):
            return f"open {tracking_uri}"
        return f"mlflow ui --backend-store-uri {short_sqlite_uri(tracking_uri)}"
