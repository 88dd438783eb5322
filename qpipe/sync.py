"""``python -m qpipe.sync <run_dir> [--tracking-uri URI]``: push a run folder's record to MLflow.

For runs whose tracking server stopped answering mid-run (the run went on and kept everything
in ``<run_dir>/run.json``), or to copy a run into another store. When the run already exists
there, what it lacks is added and its status set; otherwise a new run is made, tagged
``qpipe.synced_from`` with the original run id.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qpipe.tracking.journal import RECORD, RunJournal
from qpipe.tracking.runs import _flatten


def _target_run(client: MlflowClient, data: dict) -> tuple[str, bool]:
    """The run to write into: the original when the store has it, else a new one."""
    if data.get("run_id"):
        try:
            return client.get_run(data["run_id"]).info.run_id, False
        except MlflowException:
            pass
    name = data.get("experiment") or "qpipe"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    tags = {**data["tags"], "qpipe.synced_from": str(data.get("run_id"))}
    run = client.create_run(
        experiment_id, start_time=data.get("start_time_ms"), tags=tags, run_name=data["run_name"]
    )
    return run.info.run_id, True


def sync(run_dir: Path, tracking_uri: str | None = None) -> str:
    """Push ``run_dir``'s record; returns one line saying what was pushed where."""
    journal = RunJournal.read(run_dir)
    data = journal.data
    uri = tracking_uri or data["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    run_id, created = _target_run(client, data)
    have = client.get_run(run_id).data

    flat: dict[str, object] = {}
    _flatten("", data["params"], flat)
    params = [Param(k, str(v)[:6000]) for k, v in flat.items() if k not in have.params]
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, 0)
        for k, v in data["metrics"].items()
        if isinstance(v, int | float) and not isinstance(v, bool) and have.metrics.get(k) != v
    ]
    tags = [RunTag(k, str(v)[:5000]) for k, v in data["tags"].items()]
    for i in range(0, max(len(params), len(metrics), len(tags)), 100):
        client.log_batch(
            run_id, metrics=metrics[i : i + 100], params=params[i : i + 100], tags=tags[i : i + 100]
        )
    for artifact_file in data["texts"]:
        client.log_text(run_id, journal.text_file(artifact_file).read_text(), artifact_file)
    missing = []
    for path, folder in data["artifacts"]:
        if Path(path).is_file():
            client.log_artifact(run_id, path, folder)
        else:
            missing.append(path)
    status = data["status"] if data["status"] != "RUNNING" else "FAILED"
    client.set_terminated(run_id, status, end_time=data.get("end_time_ms"))
    data["synced"].append({"tracking_uri": uri, "run_id": run_id, "at_ms": now})
    journal.save()
    line = (
        f"synced {run_dir} to {uri}: {'new ' if created else ''}run {run_id} ({status}), "
        f"{len(params)} params, {len(metrics)} metrics, "
        f"{len(data['texts']) + len(data['artifacts']) - len(missing)} files"
    )
    if missing:
        line += f"; {len(missing)} artifact files no longer exist (first: {missing[0]})"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qpipe.sync", description=__doc__)
    parser.add_argument("run_dir", type=Path, help=f"a qpipe run folder (holds {RECORD})")
    parser.add_argument(
        "--tracking-uri", help="where to push (default: the URI the run was logging to)"
    )
    args = parser.parse_args(argv)
    if not (args.run_dir / RECORD).is_file():
        print(f"error: {args.run_dir} holds no {RECORD}: not a qpipe run folder", file=sys.stderr)
        return 2
    try:
        print(sync(args.run_dir, args.tracking_uri))
    except Exception as err:  # the server is still down: one line, try again later
        reason = " ".join(str(err).split())[:300]
        print(f"error: sync of {args.run_dir} failed: {type(err).__name__}: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
