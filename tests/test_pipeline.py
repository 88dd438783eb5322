"""The runner and the whole pipeline, for real: MLflow runs, failures, the CLI sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from qpipe.app import run_pipeline
from qpipe.tracking.runs import default_tracking_uri
from tests.conftest import compose_config


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=default_tracking_uri())


def test_budget_that_cannot_fit_stops_before_any_weight_loads(outputs_dir, tmp_path) -> None:
    cfg = compose_config(
        "model=internvl", "model.weights=random", "hardware=rtx4060_8gb", "quant=none"
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FAILED" and report.failed_stage == "memory_budget"
    assert "weights 17.06" in report.error and "rtx4060_8gb" in report.error
    assert "would fit" in report.error
    # The numbers were still logged, and nothing was materialised.
    run = _client().get_run(report.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["qpipe.failed_stage"] == "memory_budget"
    assert run.data.metrics["mem.est_weights_gb"] == pytest.approx(17.06, abs=0.01)
    artifacts = {a.path for a in _client().list_artifacts(report.run_id, "artifacts")}
    assert "artifacts/memory_breakdown.png" in artifacts
    assert not list((outputs_dir / "cache" / "models").glob("internvl*"))
    assert "load" not in report.results


def test_estimate_pipeline_on_the_real_architecture(tmp_path) -> None:
    cfg = compose_config(
        "+model=internvl",
        "model.weights=random",
        "+quant=bnb_nf4",
        "pipeline=estimate",
        "hardware=rtx4090_24gb",
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED"
    assert list(report.results) == ["env_check", "memory_budget"]
    assert report.results["memory_budget"].outputs["fits"] is True
    assert report.metrics["model.params_b"] == pytest.approx(8.528, abs=0.002)


def _mlflow_runs(experiment: str, sweep: str | None = None):
    """The pipeline runs of an experiment (a sweep's parent run left out)."""
    mlflow.set_tracking_uri(default_tracking_uri())
    query = f"tags.`qpipe.sweep` = '{sweep}'" if sweep else ""
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query)
    if "tags.qpipe.role" in runs:
        runs = runs[runs["tags.qpipe.role"] != "parent"].reset_index(drop=True)
    return runs


@pytest.mark.slow
def test_cli_sweep_runs_the_default_pipeline_on_smollm2(outputs_dir) -> None:
    env = {**os.environ, "QPIPE_OUTPUTS": str(outputs_dir), "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qpipe",
            "--multirun",
            "+quant=none,bnb_nf4",
            "eval=quick",
            "eval.max_tokens=512",  # half of quick's: nf4 vs none is clear on 512 tokens
            "eval.window=256",
            "workload.context_len=256",
            "mlflow.experiment=e2e",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _mlflow_runs("e2e")
    assert len(runs) == 2
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["tags.qpipe.sweep"].nunique() == 1  # one tag selects the whole sweep
    by_quant = {row["params.quant"]: row for _, row in runs.iterrows()}
    for row in by_quant.values():
        for metric in (
            "mem.est_weights_gb",
            "mem.est_peak_gb",
            "mem.measured_peak_gb",
            "mem.est_error_pct",
            "quality.ppl",
            "quality.ppl_delta_pct",
            "perf.ttft_ms",
            "perf.decode_tok_s",
            "perf.prefill_tok_s",
            "time.quantize_s",
            "time.benchmark_s",
        ):
            assert row[f"metrics.{metric}"] == row[f"metrics.{metric}"], metric  # not NaN
        assert row["params.model"] == "smollm2-135m"
    none, nf4 = by_quant["none"], by_quant["bnb_nf4"]
    assert nf4["metrics.quality.ppl"] > none["metrics.quality.ppl"]
    assert abs(none["metrics.quality.ppl_delta_pct"]) < 1e-6  # the baseline is itself
    # Agreement with the unquantized model: exact for itself, not for nf4; on both domains.
    assert none["metrics.quality.kld"] == pytest.approx(0.0, abs=1e-6)
    assert none["metrics.quality.top1_agree"] == 1.0
    assert none["metrics.quality.bleu_vs_baseline"] == pytest.approx(100.0)
    assert nf4["metrics.quality.kld"] > 0.01 and nf4["metrics.quality.top1_agree"] < 1.0
    assert nf4["metrics.quality.ppl.pydocs"] > none["metrics.quality.ppl.pydocs"]
    assert nf4["metrics.quality.ppl.gpl3"] == nf4["metrics.quality.ppl"]
    assert nf4["metrics.quality.ppl_delta_pct.pydocs"] > 0
    assert nf4["metrics.mem.est_weights_gb"] < none["metrics.mem.est_weights_gb"]
    artifacts = {a.path for a in _client().list_artifacts(nf4["run_id"], "artifacts")}
    assert {"artifacts/memory_breakdown.png", "artifacts/sample.txt"} <= artifacts
    top = {a.path for a in _client().list_artifacts(nf4["run_id"])}
    assert {"config.yaml", "stages", "qpipe.log"} <= top
    assert Path(nf4["tags.qpipe.run_dir"]).is_dir()


@pytest.mark.slow
def test_a_cached_checkpoint_is_reused_and_loads(tmp_path) -> None:
    """The second run hits the quantize cache and loads the checkpoint from its final path."""
    overrides = (
        "model=tiny_llama",
        "quant=rtn",
        "quant.format=qpipe-w4",
        "eval=quick",
        "workload.context_len=64",
        "mlflow.experiment=cache",
        "eval.quality_on_random=true",  # the perplexity below checks the reloaded weights
    )
    first = run_pipeline(compose_config(*overrides), tmp_path / "first")
    second = run_pipeline(compose_config(*overrides, "kernel=torch"), tmp_path / "second")
    assert first.status == second.status == "FINISHED", (first.error, second.error)
    assert first.params["cache.quantize"] == "miss"
    assert second.params["cache.quantize"] == "hit"
    checkpoint = second.results["quantize"].outputs["checkpoint"]
    assert ".partial" not in checkpoint and Path(checkpoint).is_dir()
    assert second.metrics["quality.ppl"] == pytest.approx(first.metrics["quality.ppl"], rel=1e-4)
