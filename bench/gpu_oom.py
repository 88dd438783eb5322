"""CUDA out-of-memory in load, validate_vram and benchmark, made real on one GPU.

    python bench/gpu_oom.py bench/results          # writes oom_<gpu>.json and .md there

For each stage, another process ("the hog") holds GPU memory so that only a little is free,
then a two-job sweep of the Qwen3-8B architecture (random bf16 weights, 16.4 GB) runs with
``hardware=h100_80gb`` named, so the budget passes and the real allocation fails:

- load: 12 GB free: the weights cannot load; the second job (the same architecture cut to two
  decoder layers, 3.3 GB) must finish.
- validate_vram: 24 GB free: batch 64 × 4096 tokens needs ~39 GB of KV cache; the second job
  (batch 1) needs 16.9 GB, which fits only if the first job's 16.4 GB of weights were freed.
- benchmark: 24 GB free: decoding 2048-token prompts at batch 128 needs ~39 GB of KV cache on
  top of the weights (the budget prices the workload, batch 1); the second job (decode batch 1)
  finishes only if the first job's memory was freed.

Promise checked: the first job ends FAILED at that stage with the requested and free memory and
the budget's estimate in its reason, and the next job of the sweep FINISHES.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
BASE = [
    "model.weights=random",
    "quant=none",
    "hardware=h100_80gb",
    "eval=quick",
    "eval.baseline=false",
    "eval.decode=eager",  # compiling is not what this measures; it would take minutes
]
LAYERS = "model.config.num_hidden_layers"
CASES = {
    "load": (12, ["--multirun", "model=qwen3_8b", *BASE, f"{LAYERS}=36,2"]),
    "validate_vram": (
        24,
        ["--multirun", "model=qwen3_8b", *BASE, "workload.context_len=4096",
         "workload.batch_size=64,1"],
    ),
    "benchmark": (
        24,
        ["--multirun", "model=qwen3_8b", *BASE, "eval.prefill_tokens=2048",
         "eval.decode_batch_sizes=[1,128],[1]"],
    ),
}  # fmt: skip

HOG = """
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
keep = int(float(sys.argv[1]) * 1e9)
hog = torch.empty(max(free - keep, 0), dtype=torch.uint8, device="cuda")
print("ready", flush=True)
time.sleep(3600)
"""


PREPARE = """
from hydra import compose, initialize_config_dir
from qpipe.config.compose import CONF_DIR
from qpipe.models import load_tokenizer, materialize
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    for layers in (36, 2):
        cfg = compose("config", overrides=["model=qwen3_8b", "model.weights=random",
                                           f"model.config.num_hidden_layers={layers}"])
        print(materialize(cfg.model), flush=True)
        load_tokenizer(cfg.model)
"""


def _env(outputs: Path) -> dict[str, str]:
    env = {**os.environ, "QPIPE_OUTPUTS": str(outputs), "COLUMNS": "200", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _hog(free_gb: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOG, str(free_gb)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _case(stage: str, free_gb: float, overrides: list[str], outputs: Path) -> dict:
    experiment = f"oom_{stage}"
    env = _env(outputs)
    hog = _hog(free_gb)
    try:
        free_at_start = torch.cuda.mem_get_info()[0] / GB
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "qpipe", *overrides, f"mlflow.experiment={experiment}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        seconds = time.perf_counter() - start
    finally:
        hog.kill()
        hog.wait()
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = sorted(
        # The sweep's parent run holds no stage of its own: only the jobs are compared.
        [
            r
            for r in (client.search_runs([exp.experiment_id]) if exp else [])
            if r.data.tags.get("qpipe.role") != "parent"
        ],
        key=lambda r: int(r.data.tags.get("qpipe.sweep_job", 0)),
    )
    jobs = [
        {
            "overrides": r.data.tags.get("qpipe.overrides"),
            "status": r.info.status,
            "failed_stage": r.data.tags.get("qpipe.failed_stage"),
            "reason": r.data.tags.get("qpipe.failure"),
            "seconds": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None,
        }
        for r in runs
    ]
    first = jobs[0] if jobs else {}
    reason = first.get("reason") or ""
    kept = (
        len(jobs) == 2
        and first["status"] == "FAILED"
        and first["failed_stage"] == stage
        and all(w in reason for w in ("out of memory", "requested", "free", "estimated"))
        and jobs[1]["status"] == "FINISHED"
    )
    return {
        "stage": stage,
        "free_gb_left_by_hog": round(free_at_start, 2),
        "command": "python -m qpipe " + " ".join(overrides),
        "jobs": jobs,
        "sweep_seconds": round(seconds, 1),
        "kept": kept,
        "stdout_tail": proc.stdout[-1500:],
        "stderr_tail": proc.stderr[-1500:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for oom_<gpu>.json / .md")
    parser.add_argument("--outputs", type=Path, help="qpipe outputs folder (default: a temp dir)")
    args = parser.parse_args()
    outputs = args.outputs or Path(tempfile.mkdtemp(prefix="qpipe-oom-"))
    # The random weights are made (on the GPU) before any hog holds memory.
    subprocess.run([sys.executable, "-c", PREPARE], env=_env(outputs), cwd=REPO, check=True)
    name = torch.cuda.get_device_name()
    results = {
        "command": f"python bench/gpu_oom.py {args.out}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": name,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "driver": subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            ).stdout.split("\n")[0],  # one line per GPU: they are the same driver
        },
        "cases": [_case(stage, free, ov, outputs) for stage, (free, ov) in CASES.items()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = name.lower().replace("nvidia ", "").split()[0]
    (args.out / f"oom_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# CUDA out-of-memory faults on {name}",
        "",
        f"`{results['command']}` — {results['date']}, "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
        "| stage | free (GB) | job 1: state, reason | job 2 | kept |",
        "|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        jobs = case["jobs"] + [{}, {}]
        first, second = jobs[0], jobs[1]
        lines.append(
            f"| {case['stage']} | {case['free_gb_left_by_hog']} | {first.get('status')} at "
            f"{first.get('failed_stage')}: {first.get('reason')} | {second.get('status')} | "
            f"{'yes' if case['kept'] else '**no**'} |"
        )
    (args.out / f"oom_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
