"""One pipeline execution: validate the config into the run's settings, open the MLflow run,
have the runner run the DAG in it, close the run, summarise.

The app owns the run (the tracking server, its name, tags and params, the offline journal,
the log file, the status it ends with); the runner owns the stages inside it."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qpipe.backends import option_label
from qpipe.config.pathcheck import require_new_or_folder
from qpipe.config.safety import policy_from, set_policy
from qpipe.config.settings import Settings
from qpipe.console.logrepeats import once_per_run
from qpipe.console.noise import terminal_for_run
from qpipe.console.progress import heartbeat
from qpipe.console.summary import metrics_table, options_table, outputs_warning, random_weights
from qpipe.dag import load_dag, pipeline_ref
from qpipe.devices.budget import device_table
from qpipe.preflight import validate_config
from qpipe.runner import Runner, RunReport
from qpipe.store.claims import RUN_CLAIM, claimed
from qpipe.tracking.journal import JournaledTracker, RunJournal, tracking_place, tracking_stopped
from qpipe.tracking.runs import Tracker, TrackingRefused, refusal
from qpipe.tracking.stale_runs import close_dead_runs, owner_tags
from qpipe.tracking.store_check import store_problem
from qpipe.tracking.uri import resolve_tracking_uri

log = logging.getLogger("qpipe")


def stable_params(cfg: DictConfig, settings: Settings) -> dict[str, str]:
    """The params every run logs under names that stay stable (DESIGN.md)."""
    return {
        "model": cfg.model.name,
        "quant": settings.quant.name,
        "quant.method": settings.quant.method,
        "quant.bits": settings.quant.bits,
        "quant.group_size": settings.quant.group_size,
        "hardware": cfg.hardware.name,
        "pipeline": pipeline_ref(cfg),
        "model.weights": "random" if random_weights(cfg.model) else "real",
        "workload.batch_size": cfg.workload.batch_size,
        "workload.context_len": cfg.workload.context_len,
        "device": settings.device,
    }


def run_name(cfg: DictConfig) -> str:
    """``model/quant``, with the width where a method has several (``smollm2-135m/gptq-w3``)."""
    return f"{cfg.model.name}/{option_label(cfg.quant.name, cfg.quant.method, cfg.quant.bits)}"


def run_pipeline(
    cfg: DictConfig, run_dir: Path, tags: dict[str, str] | None = None, log_file: Path | None = None
) -> RunReport:
    """Run the configured pipeline once, tracked in MLflow. Config errors raise before any
    MLflow run is opened or any weight is touched."""
    settings = validate_config(cfg)
    set_policy(policy_from(cfg.model))
    dag = load_dag(pipeline_ref(cfg))
    require_new_or_folder(run_dir, "the run folder (hydra.run.dir)")
    # One live run per folder: its run.json, qpipe.log and logged files are its own.
    refusal = (
        f"the run folder {run_dir} is in use by another qpipe run ({{holder}}); give each run "
        "its own folder (the default hydra.run.dir does)"
    )
    with claimed(run_dir, RUN_CLAIM, refusal), terminal_for_run(log_file):
        # Library output through logging: the terminal gets what matters, the log file all.
        return _tracked_run(cfg, settings, dag, run_dir, tags, log_file)


def _tracked_run(
    cfg: DictConfig,
    settings: Settings,
    dag,
    run_dir: Path,
    tags: dict[str, str] | None,
    log_file: Path | None,
) -> RunReport:
    # Before the run opens: a tracking server that is down, a local store that is read-only,
    # locked, damaged or full: one line in seconds.
    mlflow_tracker = Tracker(resolve_tracking_uri(cfg.mlflow), cfg.mlflow.experiment)
    uri = mlflow_tracker.tracking_uri
    tracker = JournaledTracker(mlflow_tracker, RunJournal(run_dir))
    all_tags = {"qpipe.pipeline": dag.name, "qpipe.run_dir": str(run_dir), **owner_tags()}
    all_tags.update(tags or {})
    try:
        close_dead_runs(uri)
        run_id = tracker.start(run_name(cfg), all_tags)
    except Exception as err:  # the store failed between the check and the run's opening
        raise TrackingRefused(
            store_problem(uri, err) or refusal(uri, cfg.mlflow.experiment, err)
        ) from None
    tracker.log_params(stable_params(cfg, settings))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    runner = Runner(cfg, dag, run_dir, tracker, settings)
    try:
        with once_per_run(), heartbeat(lambda: runner.report.stage, hints=_slow_hints(cfg)):
            runner.run()
    finally:
        # Whatever ended it (a finished DAG, a failed stage, an interrupt the runner marked
        # KILLED, a bug), the run is closed with the status the runner reached.
        report = runner.report
        if log_file is not None and log_file.is_file():
            tracker.log_artifact(log_file)
        tracker.end(report.status if report.status in ("FINISHED", "KILLED") else "FAILED")
    report.run_id = run_id
    report.ui_hint = tracker.ui_hint()
    if tracker.offline is not None:
        report.tracking_offline = (
            f"MLflow {tracking_place(uri)} {tracking_stopped(uri)} ({tracker.offline}); "
            f"the results are in {tracker.journal.path}; push them later with: "
            f"python -m qpipe.sync {run_dir}"
        )
    return report


def _slow_hints(cfg: DictConfig) -> dict[str, str]:
    """What the first "still running" line of a long stage suggests."""
    ev = cfg.get("eval")
    if ev is None or int(ev.get("max_tokens", 0)) <= 1024:
        return {}
    quick = "eval=quick measures less, for a first look"
    return {"baseline": quick, "benchmark": quick}


def placement_table(placement: dict) -> Table:
    table = Table(title=f"device map ({placement['strategy']}): GB per device")
    for column in ("device", "weights", "est. total", "usable", "verdict"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for row in device_table(placement):
        table.add_row(*row)
    return table


def print_summary(cfg: DictConfig, report: RunReport, console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"qpipe · {cfg.model.name} · quant={cfg.quant.name} · {report.status}", highlight=False
    )
    if report.metrics:
        table, quality_left_out = metrics_table(cfg, report)
        console.print(table)
        if quality_left_out:
            console.print(
                "quality left out: random weights (model.weights=random) make it noise",
                highlight=False,
            )
    budget = report.results.get("memory_budget")
    if budget is not None and budget.outputs.get("placement"):
        console.print(placement_table(budget.outputs["placement"]))
    if budget is not None and budget.outputs.get("options") and "load" not in report.results:
        # Nothing was loaded (pipeline=estimate, or stopped by the budget): the options are
        # the answer.
        console.print(options_table(budget.outputs, cfg.quant.name, cfg.hardware.name))
    if budget is not None and budget.outputs.get("verdict"):
        console.print(f"memory budget: {budget.outputs['verdict']}", highlight=False)
    train = report.results.get("train")
    if train is not None and train.outputs.get("summary"):  # pipeline=finetune's proof
        console.print(f"train: {train.outputs['summary']}", highlight=False)
    if report.error:
        error = " ".join(report.error.split())  # one line, however the message was made
        console.print(
            f"[red]✘ {report.failed_stage}: {escape(error)}[/red]",
            highlight=False,
            soft_wrap=True,
        )
    if report.tracking_offline:
        console.print(
            f"[yellow]! {escape(report.tracking_offline)}[/yellow]", highlight=False, soft_wrap=True
        )
    console.print(f"MLflow run {report.run_id}; to compare runs:", highlight=False)
    console.print(f"  {report.ui_hint}", highlight=False, soft_wrap=True)  # copied as one line
    warning = outputs_warning()
    if warning:
        console.print(f"[yellow]! {escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
