"""One ``python -m qpipe ...`` process as a result row: its wall time, its log, and the MLflow
run it made (metrics, params, failure), read back by the run id the summary prints. Shared by
the benchmarks that run the pipeline itself (``headline.py``, ``memory_table.py``).

Random-weight SmolLM2 (for a GPU, where the GGUF package does not travel): ``SMOLLM2_RANDOM``
is SmolLM2-135M's architecture from its config.json, written as a model config into the
working directory's ``conf/model/`` (qpipe searches ``./conf`` before its built-ins)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_RANDOM = """\
# SmolLM2-135M's architecture (its GGUF's config.json), random weights: the memory and speed
# of the real model, no package needed. Written by bench/qpipe_rows.py.
name: smollm2-135m-random
weights: random
seed: 0
random_dtype: bfloat16
tokenizer: {tokenizer}
model_class: AutoModelForCausalLM
task: causal-lm
config:
  model_type: llama
  hidden_size: 576
  intermediate_size: 1536
  num_hidden_layers: 30
  num_attention_heads: 9
  num_key_value_heads: 3
  head_dim: 64
  vocab_size: 49152
  max_position_embeddings: 8192
  rms_norm_eps: 1.0e-05
  rope_theta: 100000.0
  tie_word_embeddings: true
  bos_token_id: 1
  eos_token_id: 2
  pad_token_id: 2
"""


def outputs() -> Path:
    return Path(os.environ.get("QPIPE_OUTPUTS", "outputs")).resolve()


def write_smollm2_random(workdir: Path, tokenizer: str) -> str:
    """``conf/model/smollm2_random.yaml`` under ``workdir``; the group name to pass."""
    folder = workdir / "conf" / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smollm2_random.yaml").write_text(SMOLLM2_RANDOM.format(tokenizer=tokenizer))
    return "smollm2_random"


def run_record(run_id: str) -> dict[str, Any]:
    """Metrics, params and failure tags of one MLflow run of the outputs' store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{outputs()}/mlflow.db")
    run = client.get_run(run_id)
    return {
        "run_id": run_id,
        "mlflow_status": run.info.status,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "failed_stage": run.data.tags.get("qpipe.failed_stage"),
        "failure": run.data.tags.get("qpipe.failure"),
        "run_dir": run.data.tags.get("qpipe.run_dir"),
    }


def run_qpipe(
    args: list[str], log_path: Path, timeout_s: float, cwd: Path | None = None
) -> dict[str, Any]:
    """Run ``python -m qpipe args`` (stdout and stderr into ``log_path``) and read back its
    MLflow run. ``status``: FINISHED, or FAILED with ``error``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), _pythonpath()]))}
    env.setdefault("COLUMNS", "160")
    row: dict[str, Any] = {"command": "python -m qpipe " + " ".join(args)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "qpipe", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                text=True,
                cwd=cwd,
                env=env,
            )
            row["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            row["returncode"] = None
            row["error"] = f"timed out after {timeout_s:.0f} s"
    row["wall_s"] = round(time.perf_counter() - start, 1)
    text = log_path.read_text(errors="replace")
    found = re.findall(r"MLflow run ([0-9a-f]{32})", text)
    if found:
        row.update(run_record(found[-1]))
    finished = row.get("mlflow_status") == "FINISHED" and not row.get("error")
    row["status"] = "FINISHED" if finished else "FAILED"
    if not finished and not row.get("error"):
        row["error"] = row.get("failure") or "\n".join(text.strip().splitlines()[-5:])
    return row


def _pythonpath() -> str:
    return os.environ.get("PYTHONPATH", "")


def stage_times(metrics: dict[str, float]) -> dict[str, float]:
    """``time.<stage>_s`` of a run, in the DAG's order where known."""
    order = (
        "env_check",
        "sensitivity",
        "memory_budget",
        "exclude_layers",
        "pad_align",
        "baseline",
        "quantize",
        "load",
        "validate_vram",
        "benchmark",
    )
    return {s: metrics[f"time.{s}_s"] for s in order if f"time.{s}_s" in metrics}


def dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def append_tail(path: Path, title: str, log: Path, lines: int = 40) -> None:
    """The last ``lines`` of a run's log under a title, appended to one file."""
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
    with path.open("a") as f:
        f.write(f"===== {title} ({log})\n" + "\n".join(text) + "\n")
