"""A multirun as one MLflow parent run with a nested child run per job (MLflow's own nesting:
the ``mlflow.parentRunId`` tag), the comparison on the parent — table (CSV/Markdown/HTML) and
Pareto plot — refreshed as each job finishes, and resume after a kill.

Resume: a sweep is known by its command (experiment + the multirun's overrides + the sweeper's
axes). Run the same command again after the sweep was killed or had failing jobs, and the
unfinished parent is taken up again: jobs whose child run FINISHED are skipped, a job's earlier
unfinished child (RUNNING when SIGKILL struck, or FAILED) is deleted before it runs again, so the
parent shows every job once. Cached stages are reused as in any run; a checkpoint being written
when the kill came sits in a ``.partial`` folder that is never read (see the runner).

Never from under a live one: the parent records the process that runs it (host, pid), and the
same command started again while that process lives (a second terminal, an overlapping cron)
is refused in one line naming it. The sweep folder is claimed by the sweep that writes in it
(qpipe.store.claims) and stamped with its key: another sweep given the same
``hydra.sweep.dir`` — at the same time or later — is refused instead of overwriting its jobs'
records. A launcher that cannot start (``n_jobs=0``, SLURM's launcher where there is no SLURM)
is refused before the parent opens; a sweep ended by a signal closes its parent KILLED.

Failures: every job runs; at the end the parent is FAILED if any job failed, each failure is
printed with its reason, and ``python -m qpipe`` exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from qpipe.config.pathcheck import require_new_or_folder
from qpipe.errors import ConfigError, ConfigRefusal, QpipeError
from qpipe.report import PARENT_ROLE, load_runs, write_comparison
from qpipe.store.claims import RUN_CLAIM, SWEEP_CLAIM, live_holder, release, take
from qpipe.tracking.runs import Tracker
from qpipe.tracking.stale_runs import HOST, PID, PID_STARTED, alive, owner_tags
from qpipe.tracking.store_check import store_problem
from qpipe.tracking.uri import resolve_tracking_uri

log = logging.getLogger("qpipe")

_current: Sweep | None = None
_last_exit_code = 0


@dataclass
class JobOutcome:
    num: int
    overrides: str
    status: str  # FINISHED | FAILED | SKIPPED (finished in an earlier attempt)
    error: str | None = None
    run_id: str | None = None


def job_key(overrides: list[str]) -> str:
    """A job's identity within its sweep: its overrides, order-free."""
    return hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:16]


def sweep_key(experiment: str, overrides: list[str], axes: dict[str, Any]) -> str:
    """A sweep's identity: the same command (overrides and preset axes) gives the same key."""
    blob = {"experiment": experiment, "overrides": sorted(overrides), "axes": axes}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def command_key(cfg: DictConfig) -> tuple[list[str], dict[str, Any], str]:
    """The multirun's overrides, its preset's axes and its sweep key."""
    overrides = list(cfg.hydra.overrides.task)
    params = cfg.hydra.sweeper.get("params")
    axes = OmegaConf.to_container(params, resolve=False) if params else {}
    return overrides, axes, sweep_key(cfg.mlflow.experiment, overrides, axes)


def _refuse_if_live(run: Any) -> None:
    """ConfigRefusal when the RUNNING parent ``run`` belongs to a process that still runs (on
    this host: its pid and start time; elsewhere: assumed, until that host marks it)."""
    tags = run.data.tags
    pid, host = tags.get(PID), tags.get(HOST)
    if pid is None:  # a parent of an older qpipe: no owner recorded, resumed as before
        return
    if host == socket.gethostname() and not alive(int(pid), tags.get(PID_STARTED, "")):
        return  # its process is gone (SIGKILL, power loss): take it up
    where = f"pid {pid}" + ("" if host == socket.gethostname() else f" on host {host}")
    raise ConfigRefusal(
        f"this sweep (the same command) is already running in {where}, parent MLflow run "
        f"{run.info.run_id}; wait for it to end, or stop it and run the command again to "
        "resume it"
    )


def check_launcher(cfg: DictConfig) -> None:
    """ConfigRefusal (one line) for a launcher that cannot start here, before the parent run
    opens: joblib with no worker, SLURM's launcher without SLURM."""
    launcher = cfg.hydra.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs = launcher.get("n_jobs")
        cores = os.cpu_count() or 1
        effective = n_jobs if not isinstance(n_jobs, int) or n_jobs >= 0 else cores + 1 + n_jobs
        if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or effective < 1:
            raise ConfigRefusal(
                f"hydra.launcher.n_jobs={n_jobs!r} runs no job; use a number of parallel jobs "
                f"≥ 1 (or -1 for one per core), or leave it out (one job per GPU)"
            )
    if target.endswith("SlurmLauncher"):
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise ConfigRefusal(
                f"hydra/launcher=submitit_slurm needs SLURM, and {', '.join(missing)} is not on "
                "this machine's PATH; run it from a cluster's login node, or sweep here with "
                "the default launcher (or hydra/launcher=joblib: one job per GPU)"
            )


_claim: int | None = None  # the sweep folder this process claimed


def claim_sweep_dir(cfg: DictConfig, key: str) -> None:
    """Claim the sweep folder for this sweep; ConfigRefusal when a live sweep writes there, or
    when it holds another sweep's jobs (a different command)."""
    global _claim
    folder = Path(str(cfg.hydra.sweep.dir))
    try:
        require_new_or_folder(folder, "hydra.sweep.dir")
    except ConfigError as err:
        raise ConfigRefusal(str(err)) from None
    try:
        _claim = take(
            folder,
            SWEEP_CLAIM,
            f"hydra.sweep.dir={folder} is in use by another sweep ({{holder}}); give each "
            "sweep its own folder (the default hydra.sweep.dir does)",
        )
    except QpipeError as err:
        raise ConfigRefusal(str(err)) from None
    stamp = folder / ".qpipe-sweep.json"
    try:
        earlier = json.loads(stamp.read_text()).get("key") if stamp.is_file() else None
    except (OSError, ValueError):
        earlier = None
    if earlier is not None and earlier != key:
        release_sweep_dir()
        raise ConfigRefusal(
            f"hydra.sweep.dir={folder} holds the jobs of another sweep (another command); "
            "give this one its own folder, or remove that one"
        )
    stamp.write_text(json.dumps({"key": key}))


def release_sweep_dir() -> None:
    global _claim
    if _claim is not None:
        release(_claim)
        _claim = None


def check_run_dir(cfg: DictConfig) -> None:
    """Before Hydra makes the run folder and writes its ``.hydra`` files there: it must be a
    folder (or nothing yet) that no live run writes in."""
    folder = Path(str(cfg.hydra.run.dir))
    try:
        require_new_or_folder(folder, "hydra.run.dir")
    except ConfigError as err:
        raise ConfigRefusal(str(err)) from None
    holder = live_holder(folder, RUN_CLAIM)
    if holder is not None:
        raise ConfigRefusal(
            f"hydra.run.dir={folder} is in use by another qpipe run ({holder}); give each run "
            "its own folder (the default hydra.run.dir does)"
        )


def swept_axes(overrides: list[str], preset: dict[str, Any]) -> dict[str, list[str]]:
    """What the sweep varies: each key with its values, from the preset's sweeper params with
    the command line's values over them (as Hydra's basic sweeper merges them); keys with a
    single value are fixed, not axes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    values: dict[str, list[str]] = {}
    lines = [f"{k}={v}" for k, v in preset.items()] + list(overrides)
    for override in parser.parse_overrides(lines):
        if override.is_sweep_override():
            values[override.key_or_group] = list(override.sweep_string_iterator())
        else:
            values[override.key_or_group] = [override.get_value_element_as_str()]
    return {k: v for k, v in values.items() if len(v) > 1}


def runs_page(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI page that lists the experiment's runs (not MLflow 3's GenAI overview):
    on a tracking server its own address, else where ``mlflow ui`` serves by default."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


UI_ADDRESS = "http://127.0.0.1:5000"  # mlflow ui's default host and port


def _q(value: str) -> str:
    return value.replace("'", "\\'")


@dataclass
class Sweep:
    tracking_uri: str
    experiment: str
    key: str
    label: str
    parent_id: str = ""
    experiment_id: str = ""
    resumed: bool = False
    outcomes: list[JobOutcome] = field(default_factory=list)

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: DictConfig) -> Sweep:
        """Find this command's unfinished parent run, or start a new one; refuse (one line)
        when that parent is live in another process."""
        uri = resolve_tracking_uri(cfg.mlflow)
        Tracker(uri, cfg.mlflow.experiment)  # creates the experiment where it is missing
        overrides, axes, key = command_key(cfg)
        sweep = cls(uri, cfg.mlflow.experiment, key, Path(cfg.hydra.sweep.dir).name)
        client = sweep.client()
        experiment_id = client.get_experiment_by_name(sweep.experiment).experiment_id
        previous = client.search_runs(
            [experiment_id],
            f"tags.`qpipe.sweep_key` = '{key}' and tags.`qpipe.role` = '{PARENT_ROLE}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if previous and previous[0].info.status != "FINISHED":
            run = previous[0]
            if run.info.status == "RUNNING":
                _refuse_if_live(run)
            sweep.parent_id, sweep.resumed = run.info.run_id, True
            sweep.label = run.data.tags.get("qpipe.sweep", sweep.label)
            client.update_run(sweep.parent_id, status="RUNNING")
            now = {**owner_tags(), "qpipe.sweep_dir": str(cfg.hydra.sweep.dir)}
            for name, value in now.items():  # this process runs it now, from this folder
                client.set_tag(sweep.parent_id, name, value)
            log.info("resuming sweep %s (parent run %s)", sweep.label, sweep.parent_id)
        else:
            swept = swept_axes(overrides, axes)
            axes_text = " ".join(f"{k}={','.join(v)}" for k, v in swept.items())
            run = client.create_run(
                experiment_id,
                run_name=f"sweep {axes_text or 'of one job'} ({sweep.label})"[:250],
                tags={
                    "qpipe.role": PARENT_ROLE,
                    "qpipe.sweep": sweep.label,
                    "qpipe.sweep_key": key,
                    "qpipe.overrides": " ".join(overrides),
                    "qpipe.sweep_axes": axes_text,
                    "qpipe.sweep_dir": str(cfg.hydra.sweep.dir),
                    **owner_tags(),  # a killed sweep's parent is marked by the next start
                },
            )
            sweep.parent_id = run.info.run_id
            # The axes as params, so the parent says what was swept in the runs table.
            params = {f"sweep.{k}": ",".join(v)[:6000] for k, v in swept.items()}
            params["sweep.jobs"] = str(math.prod(len(v) for v in swept.values()))
            fixed = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in swept]
            if fixed:
                params["sweep.fixed"] = " ".join(fixed)[:6000]
            for name, value in params.items():
                client.log_param(sweep.parent_id, name, value)
        sweep.experiment_id = experiment_id
        return sweep

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    # -- jobs --------------------------------------------------------------------------------
    def child_tags(self, key: str) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent_id, "qpipe.job_key": key}

    def _children(self, key: str) -> list[Any]:
        client = self.client()
        experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        query = (
            f"tags.`mlflow.parentRunId` = '{_q(self.parent_id)}' and tags.`qpipe.job_key` = '{key}'"
        )
        return client.search_runs([experiment_id], query)

    def finished_child(self, key: str) -> str | None:
        """The run id of this job's FINISHED child from an earlier attempt, if any."""
        return next(
            (r.info.run_id for r in self._children(key) if r.info.status == "FINISHED"), None
        )

    def drop_unfinished(self, key: str) -> None:
        """Delete this job's earlier unfinished children: the job runs again, once."""
        client = self.client()
        for run in self._children(key):
            if run.info.status != "FINISHED":
                client.delete_run(run.info.run_id)
                log.info("job's earlier %s run %s replaced", run.info.status, run.info.run_id)

    def record(self, outcome: JobOutcome) -> None:
        self.outcomes.append(outcome)

    def record_failure_without_run(self, key: str, num: int, overrides: str, error: str) -> None:
        """A job that failed before its run opened (a bad config value) still gets a FAILED
        child, so the parent lists every job."""
        client = self.client()
        experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        run = client.create_run(
            experiment_id,
            run_name=f"job {num}: {overrides}"[:250],
            tags={
                **self.child_tags(key),
                "qpipe.sweep": self.label,
                "qpipe.overrides": overrides,
                "qpipe.failure": error[:5000],
            },
        )
        client.set_terminated(run.info.run_id, "FAILED")
        self.record(JobOutcome(num, overrides, "FAILED", error, run.info.run_id))

    # -- the comparison on the parent ----------------------------------------------------------
    def refresh(self) -> None:
        """Rewrite the parent's comparison table and Pareto plot from its children now. A
        tracking hiccup here costs the refresh, never the sweep."""
        try:
            runs = load_runs(self.experiment, self.tracking_uri, parent=self.parent_id)
            client = self.client()
            with tempfile.TemporaryDirectory() as tmp:
                for path in write_comparison(runs, Path(tmp), f"sweep {self.label}"):
                    client.log_artifact(self.parent_id, str(path))
            counts = {"FINISHED": 0, "FAILED": 0}
            for run in runs:
                if run.get("status") in counts:
                    counts[run["status"]] += 1
            client.log_metric(self.parent_id, "sweep.jobs_finished", counts["FINISHED"])
            client.log_metric(self.parent_id, "sweep.jobs_failed", counts["FAILED"])
        except Exception as err:  # noqa: BLE001
            log.warning("sweep comparison not updated: %s: %s", type(err).__name__, err)

    def failures(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.status == "FAILED"]

    def interrupted(self, signal_name: str) -> None:
        """End the parent KILLED (a signal stopped the sweep); resumable like any other."""
        try:
            client = self.client()
            client.set_tag(self.parent_id, "qpipe.failure", f"interrupted by {signal_name}")
            client.set_terminated(self.parent_id, "KILLED")
        except Exception as err:  # noqa: BLE001 (the store may be what failed)
            log.warning("sweep parent run not closed: %s: %s", type(err).__name__, err)

    def close(self, console: Console) -> int:
        """End the parent (FAILED if any job failed), print the outcome; the exit code."""
        self.refresh()
        failed = self.failures()
        status = "FAILED" if failed else "FINISHED"
        try:
            self.client().set_terminated(self.parent_id, status)
        except Exception as err:  # noqa: BLE001
            log.warning("sweep parent run not closed: %s: %s", type(err).__name__, err)
        skipped = sum(o.status == "SKIPPED" for o in self.outcomes)
        done = f"{len(self.outcomes)} jobs"
        if skipped:
            done += f" ({skipped} finished in an earlier attempt, not rerun)"
        console.print(f"sweep {self.label}: {done}; parent MLflow run {self.parent_id}")
        if failed:
            console.print(f"[red]✘ {len(failed)} of {len(self.outcomes)} jobs failed:[/red]")
            for o in failed:
                error = " ".join(str(o.error).split())
                console.print(f"  #{o.num} {o.overrides}: {error}", highlight=False, soft_wrap=True)
        # Last, each on a line of its own (copied whole): how to look at it.
        ui = Tracker.hint_for(self.tracking_uri)
        console.print("compare the jobs (python -m qpipe.report prints the table here):")
        console.print(f"  {ui}", highlight=False, soft_wrap=True)
        page = runs_page(self.tracking_uri, self.experiment_id)
        console.print(f"  {page}", highlight=False, soft_wrap=True)
        return 1 if failed else 0


def current() -> Sweep | None:
    """The sweep this process is running (None outside a multirun)."""
    return _current


def exit_code() -> int:
    """Non-zero when the last sweep of this command had failing jobs."""
    return _last_exit_code


def forget() -> None:
    """A new command starts: a sweep an earlier command of this process ran (an embedding
    program, a test) says nothing about this one's exit code."""
    global _current, _last_exit_code
    _current, _last_exit_code = None, 0


class SweepCallback(Callback):
    """Hydra's multirun hooks: open the parent, refresh it after each job, close it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_run_dir(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Raising anything but a SystemExit here, Hydra would only warn and run the jobs
        # without their parent: every refusal leaves as ConfigRefusal (one line, exit 2).
        global _current, _last_exit_code
        _last_exit_code = 0
        check_launcher(config)
        claim_sweep_dir(config, command_key(config)[2])
        try:
            _current = Sweep.open(config)
        except QpipeError as err:
            release_sweep_dir()
            raise ConfigRefusal(str(err)) from None
        except ConfigRefusal:
            release_sweep_dir()
            raise
        except Exception as err:  # noqa: BLE001
            release_sweep_dir()
            uri = str(config.mlflow.get("tracking_uri") or "")
            problem = store_problem(uri, err) if uri else None
            raise ConfigRefusal(
                problem
                or f"could not open the sweep's MLflow parent run: "
                f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            ) from None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        sweep = _current
        if sweep is None:
            return
        if job_return.status == JobStatus.FAILED:  # an error the job itself did not catch
            err = job_return._return_value
            overrides = " ".join(job_return.overrides or [])
            sweep.record(JobOutcome(-1, overrides, "FAILED", f"{type(err).__name__}: {err}"))
        sweep.refresh()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _current, _last_exit_code
        if _current is None:
            return
        _last_exit_code = _current.close(Console())
        _current = None
        release_sweep_dir()


def interrupted(signal_name: str) -> None:
    """A signal ended the command: the sweep running in it (if any) ends KILLED."""
    global _current
    if _current is not None:
        _current.interrupted(signal_name)
        _current = None
    release_sweep_dir()


def run_sweep_job(
    cfg: DictConfig, job_overrides: list[str], num: int, run_dir: Path, tags: dict[str, str]
) -> float | None:
    """One job of the current sweep: skipped when an earlier attempt finished it, otherwise run
    as a child of the parent; its failure is recorded (the sweep goes on) instead of raised."""
    from qpipe.app import print_summary, run_pipeline

    sweep = _current
    assert sweep is not None
    console = Console()
    key, text = job_key(job_overrides), " ".join(job_overrides)
    done = sweep.finished_child(key)
    if done:
        console.print(
            f"job {num} ({text}) finished in run {done} of this sweep: not rerun", soft_wrap=True
        )
        sweep.record(JobOutcome(num, text, "SKIPPED", run_id=done))
        return None
    sweep.drop_unfinished(key)
    # Every job logs where the parent is, even if the server came back since the sweep began.
    cfg.mlflow.tracking_uri, cfg.mlflow.fallback = sweep.tracking_uri, None
    tags = {**tags, **sweep.child_tags(key), "qpipe.sweep": sweep.label}
    try:
        report = run_pipeline(cfg, run_dir, tags, log_file=run_dir / "qpipe.log")
    except QpipeError as err:  # before the run opened: a bad value for this job
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sweep.record_failure_without_run(key, num, text, str(err))
        return None
    except Exception as err:  # noqa: BLE001 (a bug or the tracking store: the sweep goes on)
        log.exception("job %d (%s) crashed", num, text)
        sweep.record(JobOutcome(num, text, "FAILED", f"{type(err).__name__}: {err}"))
        return None
    print_summary(cfg, report, console)
    error = f"{report.failed_stage}: {report.error}" if report.error else None
    sweep.record(JobOutcome(num, text, report.status, error, report.run_id))
    return report.metrics.get("quality.ppl")
