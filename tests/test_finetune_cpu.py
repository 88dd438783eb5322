"""pipeline=finetune on SmolLM2's real weights, on CPU: real LoRA steps, the loss falling, and
each phase's host-memory growth against its estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_process


@pytest.mark.slow
def test_lora_steps_on_smollm2_fall_and_match_the_estimate(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code, out = cli_in_process(
        "pipeline=finetune", "workload.context_len=128", "workload.batch_size=2",
        "finetune.lora.rank=8", "finetune.lr=1e-3", "mlflow.experiment=finetune-test",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert code == 0, out[-3000:]
    report = json.loads((run_dir / "run.json").read_text())
    metrics = report["metrics"]
    losses = [metrics[f"train.loss.step{i}"] for i in (1, 2, 3)]
    assert losses[2] < losses[1] < losses[0], losses
    for phase in ("forward", "backward"):
        # host RSS growth over the loaded model against the estimate less the loaded weights;
        # at 256 tokens the allocator's arenas and library caches (~30 MB) weigh ~25 %
        assert abs(metrics[f"mem.{phase}_error_pct"]) < 35, metrics
    assert Path(run_dir / "stages" / "memory_budget" / "ds_config.json").is_file()
    assert "fits" in json.loads((run_dir / "logged/stages/memory_budget.json").read_text())
