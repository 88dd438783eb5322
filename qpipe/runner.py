"""The DAG runner: runs the stages of one MLflow run in dependency order, times them, caches
what may be cached, logs each stage's result into the run, and turns a stage's failure (an
error, out of memory, a full disk, an interrupt) into the run's outcome.

The run itself is opened and closed by its caller (``qpipe.app``), which owns what surrounds
the stages: the tracking server, the run's name and tags, the log file. The runner knows no
stage by name; what it needs from one is in the StageResult contract (``qpipe.stages.base``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qpipe.config.settings import Settings
from qpipe.console import signals
from qpipe.dag import Dag, StageSpec, stage_function
from qpipe.devices.oom import describe as describe_oom
from qpipe.devices.oom import is_out_of_memory, release_memory
from qpipe.errors import QpipeError
from qpipe.stages.base import StageContext, StageResult
from qpipe.store.diskspace import disk_errno, free_bytes, gb, guarded_write
from qpipe.store.entry import entry_lock, entry_problem, move_aside, new_partial, publish, seal
from qpipe.store.paths import cache_dir
from qpipe.store.results import RECORD, non_finite, record_problem
from qpipe.tracking.runs import Tracker

log = logging.getLogger("qpipe")


class NonFiniteResult(QpipeError):
    """A stage measured NaN or inf: never a result, never cached."""


CACHE_VERSION = "3"  # bump when a cached stage's result format changes (3: entry manifest)


@dataclass
class RunReport:
    status: str  # RUNNING | FINISHED | FAILED | KILLED
    results: dict[str, StageResult] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    failed_stage: str | None = None
    stage: str | None = None  # the stage running now (where an interrupt stopped the run)
    error: str | None = None
    run_id: str | None = None
    ui_hint: str | None = None
    tracking_offline: str | None = None  # set when MLflow stopped answering mid-run


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


class Runner:
    def __init__(
        self,
        cfg: DictConfig,
        dag: Dag,
        run_dir: Path,
        tracker: Tracker | None,
        settings: Settings | None = None,
    ) -> None:
        self.cfg = cfg
        self.dag = dag
        self.run_dir = run_dir
        self.tracker = tracker
        self.settings = settings
        # Read while it runs: the stage it is in (a heartbeat, an interrupt's message).
        self.report = RunReport(status="RUNNING")

    # -- caching -----------------------------------------------------------------------------
    def _cache_key(self, spec: StageSpec) -> str:
        sections = {key: OmegaConf.select(self.cfg, key) for key in spec.cache}
        blob = {
            "version": CACHE_VERSION,
            "stage": spec.module,
            "config": OmegaConf.to_container(OmegaConf.create(sections), resolve=True),
        }
        digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    @staticmethod
    def _load_cached(folder: Path, stage: str = "stage") -> StageResult | None:
        """The cached result, or None when there is none or it is damaged: a result is reused
        only if every file it wrote still holds what it wrote (its manifest) and its record
        is whole. A damaged one is moved aside (kept for inspection), never reused. Call it
        holding the entry's lock."""
        if not (folder.exists() or folder.is_symlink()):
            return None
        data = None
        problem = entry_problem(folder) if folder.is_dir() else "it is not a folder"
        if problem is None:
            try:
                data = json.loads((folder / RECORD).read_text())
                problem = record_problem(data)
            except (OSError, ValueError) as err:
                problem = f"{RECORD} is unreadable ({type(err).__name__})"
        if problem:
            move_aside(folder, problem, f"{stage} result")
            return None
        return StageResult(
            outputs=data["outputs"],
            metrics=data["metrics"],
            params=data["params"],
            artifacts=[folder / a for a in data["artifacts"]],
        )

    @staticmethod
    def _store_cached(
        partial: Path, final: Path, result: StageResult, stage: str = "stage"
    ) -> StageResult:
        # Paths are recorded as they will be after the rename; only a finished result gets the
        # final name, so a crash mid-stage is never reused.
        result = Runner._rebase(result, partial, final)
        record = {
            "outputs": _jsonable(result.outputs),
            "metrics": result.metrics,
            "params": _jsonable(result.params),
            "artifacts": [str(Path(a).relative_to(final)) for a in result.artifacts],
        }
        text = json.dumps(record, indent=2)
        with guarded_write(partial, len(text.encode()), "the cache record"):
            (partial / RECORD).write_text(text)
            seal(partial, f"{stage} result")
        publish(partial, final)
        return result

    @staticmethod
    def _rebase(result: StageResult, old: Path, new: Path) -> StageResult:
        def move(value: Any) -> Any:
            if isinstance(value, str) and value.startswith(str(old)):
                return str(new) + value[len(str(old)) :]
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        result.outputs = move(result.outputs)
        result.artifacts = [new / Path(a).relative_to(old) for a in result.artifacts]
        return result

    # -- one stage ---------------------------------------------------------------------------
    def _run_stage(self, spec: StageSpec, results: dict[str, StageResult]) -> StageResult:
        inputs = {name: results[name] for name in self.dag.upstream(spec.name)}
        run = stage_function(spec)
        if not spec.cache:
            workdir = self.run_dir / "stages" / spec.name
            workdir.mkdir(parents=True, exist_ok=True)
            return self._finite(
                spec.name, run(StageContext(self.cfg, inputs, workdir, self.settings))
            )

        key = self._cache_key(spec)
        final = cache_dir("stages", spec.name) / key
        # One writer per key (qpipe.store.entry): a run that finds another process computing
        # the same result waits for it and reuses it instead of computing it beside it.
        with entry_lock(final):
            cached = self._load_cached(final, spec.name)
            if cached is not None:
                log.info("%s: reusing cached result %s", spec.name, final)
                cached.params[f"cache.{spec.name}"] = "hit"
                return cached
            partial = new_partial(final)
            try:
                result = run(StageContext(self.cfg, inputs, partial, self.settings))
                signals.raise_pending()  # an interrupt its code swallowed: not a result
                self._finite(spec.name, result)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            if not result.cacheable:  # it had nothing to do: no result to reuse
                shutil.rmtree(partial, ignore_errors=True)
                return result
            result.params[f"cache.{spec.name}"] = "miss"
            try:
                return self._store_cached(partial, final, result, spec.name)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise

    @staticmethod
    def _finite(stage: str, result: StageResult) -> StageResult:
        bad = non_finite(result.metrics)
        if bad:
            raise NonFiniteResult(
                f"{stage} measured {', '.join(bad)}: not a number a run can use (damaged "
                "weights, or an overflow); nothing was cached (python -m qpipe.cache verify "
                "checks the cached models)"
            )
        return result

    def _log_stage(self, name: str, result: StageResult, seconds: float) -> None:
        if self.tracker is None:
            return
        if result.params:
            self.tracker.log_params(result.params)
        self.tracker.log_metrics({**result.metrics, f"time.{name}_s": seconds})
        self.tracker.log_json(result.outputs, f"stages/{name}.json")
        for artifact in result.artifacts:
            path = Path(artifact)
            if path.is_file():
                self.tracker.log_artifact(path, "artifacts")

    # -- the whole DAG -----------------------------------------------------------------------
    def run(self) -> RunReport:
        """Run every stage. Ctrl-C (or SIGTERM, see qpipe.console.signals) ends the run KILLED
        in the stage it was in, that stage's partial output removed, and is raised on."""
        self.report = report = RunReport(status="RUNNING")
        try:
            return self._run_stages(report)
        except KeyboardInterrupt as interrupt:
            report.status, report.failed_stage = "KILLED", report.stage
            report.error = f"interrupted by {getattr(interrupt, 'signal_name', 'SIGINT')}"
            if self.tracker is not None:
                self.tracker.set_tags(
                    {"qpipe.failed_stage": str(report.stage), "qpipe.failure": report.error}
                )
            raise
        finally:
            for result in report.results.values():
                for close in result.on_run_end:
                    close()
                # Live objects (models) are for the stages after their maker only: dropping
                # them here frees the memory for whatever runs next (the next job of a sweep).
                result.objects.clear()

    def _run_stages(self, report: RunReport) -> RunReport:
        for name in self.dag.order:
            spec = self.dag.stages[name]
            signals.raise_pending()
            log.info("▶ %s", name)
            report.stage = name
            if self.tracker is not None:
                self.tracker.set_tags({"qpipe.stage": name})
            start = time.perf_counter()
            try:
                result = self._run_stage(spec, report.results)
            except QpipeError as err:
                return self._fail(report, name, str(err), None)
            except Exception as err:  # anything else is a bug or an environment problem
                if is_out_of_memory(err):
                    return self._fail(report, name, self._out_of_memory(err, name, report), None)
                if disk_errno(err) is not None:
                    where = self.run_dir if not spec.cache else cache_dir("stages")
                    message = f"disk full in {name}: {err} ({gb(free_bytes(where))} free)"
                    return self._fail(report, name, message, traceback.format_exc())
                return self._fail(
                    report, name, f"{type(err).__name__}: {err}", traceback.format_exc()
                )
            seconds = time.perf_counter() - start
            report.results[name] = result
            report.metrics.update(result.metrics)
            report.metrics[f"time.{name}_s"] = seconds
            report.params.update(result.params)
            try:
                self._log_stage(name, result, seconds)
            except Exception as err:  # a tracking failure ends the run as FAILED, not a crash
                return self._fail(
                    report, name, f"logging to MLflow failed: {err}", traceback.format_exc()
                )
            if result.stop:
                return self._fail(report, name, result.stop, None)
            log.info("✔ %s (%.1f s)", name, seconds)
        signals.raise_pending()  # never FINISHED after a signal, wherever it was lost
        report.status = "FINISHED"
        report.stage = None
        return report

    @staticmethod
    def _out_of_memory(err: BaseException, stage: str, report: RunReport) -> str:
        estimates = [
            r.outputs["estimate"] for r in report.results.values() if "estimate" in r.outputs
        ]
        message = describe_oom(err, stage, estimates[-1] if estimates else None)
        left = release_memory(err, [r.objects for r in report.results.values()])
        if left is not None:
            message += f"; memory released (the allocator now holds {left:.2f} GB)"
        return message

    def _fail(self, report: RunReport, stage: str, message: str, trace: str | None) -> RunReport:
        report.status = "FAILED"
        report.failed_stage = stage
        report.error = message
        log.error("✘ %s: %s", stage, message)
        if trace:
            log.debug(trace)
        if self.tracker is not None:
            self.tracker.set_tags({"qpipe.failed_stage": stage, "qpipe.failure": message[:5000]})
            if trace:
                self.tracker.log_text(trace, "traceback.txt")
        return report
