"""quant=auto end to end on SmolLM2 (real weights, CPU) with a small calibration set: the
plan fits its budget, the loaded weights match it, and it beats uniform 4-bit RTN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qpipe.app import run_pipeline
from qpipe.backends.qlinear_loader import load_checkpoint
from qpipe.corpora.texts import read_text, token_ids
from qpipe.evaluation.harness import perplexity
from qpipe.kernels import QuantLinear
from qpipe.kernels.int8_linear import Int8Linear
from qpipe.kernels.int_linear import IntLinear
from qpipe.models import load_tokenizer
from tests.conftest import compose_config

# The default pipeline up to the loaded model: the test scores it itself, on 1024 tokens.
DAG = """
name: auto-test
stages:
  env_check: {}
  sensitivity:
    needs: [env_check]
    cache: [model, sensitivity, calib, quant.bits, quant.group_size, quant.symmetric, exclude]
  memory_budget: {needs: [env_check, sensitivity]}
  exclude_layers: {needs: [memory_budget]}
  pad_align: {needs: [exclude_layers]}
  quantize: {needs: [memory_budget, pad_align]}
  load: {needs: [quantize]}
"""
SMALL = ("sensitivity.samples=1", "sensitivity.seq_len=32", "workload.context_len=256")


def _run(tmp_path: Path, name: str, *overrides: str):
    dag = tmp_path / "dag.yaml"
    dag.write_text(DAG)
    cfg = compose_config(*overrides, *SMALL, f"pipeline={dag}", "mlflow.experiment=auto")
    report = run_pipeline(cfg, tmp_path / name)
    assert report.status == "FINISHED", report.error
    # The runner drops live objects at the end of a run: load the checkpoint it wrote.
    checkpoint = Path(report.results["quantize"].outputs["checkpoint"])
    model = load_checkpoint(checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    ids = token_ids(load_tokenizer(cfg.model), read_text("eval_gpl3.txt"), 1024)
    return report, model, perplexity(model, ids, 512, "cpu")


@pytest.mark.slow
def test_auto_fits_a_budget_between_4_and_8_bit_and_beats_uniform_rtn(tmp_path) -> None:
    budget = 0.19  # GB of weights: uniform 4-bit RTN g64 is ~0.17, uniform 8-bit ~0.23
    auto, model, ppl_auto = _run(
        tmp_path, "auto", "quant=auto", "quant.algorithm=rtn", f"quant.weights_gb={budget}"
    )
    sens = auto.results["sensitivity"].outputs
    assert sens["measured"] and len(sens["layers"]) == 210 and sens["tokens"] == 32
    assert {p.name for p in auto.results["sensitivity"].artifacts} == {"sensitivity.png"}
    plan = auto.results["memory_budget"].outputs["bit_plan"]
    assert plan["sensitivity_source"] == "measured"
    est = auto.metrics["mem.est_weights_gb"]
    assert est <= budget
    # Measured weights within 2 % of the plan.
    assert auto.metrics["mem.loaded_weights_gb"] == pytest.approx(est, rel=0.02)
    n8 = sum(
        isinstance(m, Int8Linear) or (isinstance(m, IntLinear) and m.bits == 8)
        for m in model.modules()
    )
    n4 = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n8 == auto.metrics["auto.layers_8bit"] > 0
    assert n4 == auto.metrics["auto.layers_4bit"] > 0
    # Layers the plan lifts to 8 bits are, on average, more sensitive than those left at 4.
    kl = {n: v["kl"] for n, v in sens["layers"].items()}
    at8 = [kl[n] / sens["layers"][n]["numel"] for n, b in plan["bits"].items() if b == 8]
    at4 = [kl[n] / sens["layers"][n]["numel"] for n, b in plan["bits"].items() if b == 4]
    assert sum(at8) / len(at8) > sum(at4) / len(at4)

    rtn, _, ppl_rtn = _run(tmp_path, "rtn", "quant=rtn")
    assert rtn.metrics["mem.est_weights_gb"] < est
    assert ppl_auto < ppl_rtn
