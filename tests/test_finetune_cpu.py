"""pipeline=finetune on SmolLM2's real weights, on CPU, in this process: real LoRA steps, the
loss falling, each phase's host-memory growth against its estimate, and the plan files
(DeepSpeed JSON, accelerate config) among the MLflow run's artifacts, also for a plan that
does not fit the card."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import cli_in_process

PLAN_FILES = {"ds_config.json", "accelerate_config.yaml"}


def _run(tmp_path, *args: str) -> tuple[int, str, dict]:
    run_dir = tmp_path / "run"
    code, out = cli_in_process(*args, "mlflow.experiment=finetune-test", f"hydra.run.dir={run_dir}")
    report = json.loads((run_dir / "run.json").read_text())
    return code, out, report


def _artifacts(report: dict) -> set[str]:
    client = MlflowClient(report["tracking_uri"])
    return {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(report["run_id"], "artifacts")}


@pytest.mark.slow
def test_lora_steps_on_smollm2_fall_and_match_the_estimate(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, report = _run(tmp_path, "pipeline=finetune", "finetune.train_seq_len=128")
    assert code == 0, out[-3000:]
    metrics = report["metrics"]
    losses = [metrics[f"train.loss.step{i}"] for i in (1, 2, 3)]
    assert losses[2] < losses[1] < losses[0], losses
    assert metrics["train.seq_len"] == 128
    for phase in ("forward", "backward", "optimizer_step"):
        # the resident set's growth over the trainable model, from step 2 on
        assert abs(metrics[f"mem.{phase}_error_pct"]) < 10, metrics
    assert "train: 3 lora steps on cpu, batch 1 × 128" in " ".join(out.split())
    assert _artifacts(report) >= PLAN_FILES


def test_a_plan_that_does_not_fit_still_logs_its_plan_files(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, report = _run(
        tmp_path, "model=qwen3_8b", "model.weights=random", "pipeline=estimate",
        "workload.mode=finetune", "finetune.method=full", "hardware=rtx4060_8gb",
    )  # fmt: skip
    assert code != 0 and "full fine-tuning" in out and "does not fit" in out
    assert report["status"] == "FAILED"
    assert _artifacts(report) >= PLAN_FILES


@pytest.mark.parametrize("value", ["-3", "many"])
def test_bad_train_seq_len_is_one_line(monkeypatch, tmp_path, value) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = cli_in_process("pipeline=finetune", f"finetune.train_seq_len={value}")
    assert code != 0 and "finetune.train_seq_len" in out and "Traceback" not in out
