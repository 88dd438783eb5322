"""Bigger than one GPU, measured: InternVL3.5-8B (random weights, bf16) offloaded, sharded, and
swept one job per GPU, each row a real ``python -m qpipe`` run read back from MLflow.

    python bench/multi_device.py OUT_DIR        # writes OUT_DIR/multi_device_h100.{json,md}

Rows (each the full default pipeline, eval=quick, no baseline):
- on-GPU: the whole model on one GPU (the reference for decode speed);
- offload: one GPU capped at 12 GB (``placement.max_memory_gb=12``), the rest in host memory
  (``hardware.offload_gb=64``): the GPU's measured peak vs its estimate, decode tokens/s;
- with two or more GPUs only (otherwise recorded as "not run"): sharded over two GPUs capped
  at 12 GB; a 2-job sweep on 2 GPUs (wall time vs one job); a 4-job sweep on 2 GPUs (never
  two jobs on one GPU at once).

The 17 GB random checkpoint and the MLflow store go to $QPIPE_OUTPUTS (default: a folder in
the system's temp directory), never into OUT_DIR.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model=internvl", "model.weights=random", "quant=none"]
# Eager decode in every row: an offloaded or sharded model (accelerate's hooks) cannot be
# captured in a CUDA graph, so the on-GPU reference is timed the same way.
QUICK = ["eval=quick", "eval.baseline=false", "eval.max_new_tokens=16", "eval.decode=eager"]
CAP_GB = 12
TOLERANCE_PCT = 5.0


def _outputs() -> Path:
    return Path(os.environ.get("QPIPE_OUTPUTS") or Path(tempfile.gettempdir()) / "qpipe-bench")


def _qpipe(args: list[str], experiment: str, log: Path) -> tuple[int, float, str]:
    env = {**os.environ, "QPIPE_OUTPUTS": str(_outputs()), "COLUMNS": "160"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "qpipe", *args, f"mlflow.experiment={experiment}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, wall, " ".join(cmd[1:])


def _runs(experiment: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{_outputs() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [
        {
            "status": r.info.status,
            "start": r.info.start_time / 1000,
            "end": (r.info.end_time or 0) / 1000,
            "metrics": dict(r.data.metrics),
            "params": dict(r.data.params),
            "tags": {k: v for k, v in r.data.tags.items() if k.startswith("qpipe.")},
        }
        for r in client.search_runs([exp.experiment_id])
    ]


def _per_gpu(metrics: dict) -> list[dict]:
    rows = []
    for i in range(8):
        key = f"mem.cuda{i}"
        if f"{key}.measured_peak_gb" not in metrics:
            continue
        measured = metrics[f"{key}.measured_peak_gb"]
        est = metrics.get(f"{key}.est_peak_gb")
        rows.append(
            {
                "gpu": f"cuda:{i}",
                "est_peak_gb": est,
                "measured_peak_gb": measured,
                "est_error_pct": metrics.get(f"{key}.est_error_pct"),
                "within_5pct": est is not None
                and abs(metrics[f"{key}.est_error_pct"]) <= TOLERANCE_PCT,
                "nvml_process_gb": metrics.get(f"{key}.nvml_process_gb"),
                "est_total_gb": metrics.get(f"{key}.est_total_gb"),
            }
        )
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:40]


def _single(name: str, args: list[str], tag: str, logs: Path) -> dict:
    experiment = f"multi_device_{tag}_{_slug(name)}"
    rc, wall, cmd = _qpipe([*MODEL, *QUICK, *args], experiment, logs / f"{_slug(name)}.log")
    runs = _runs(experiment)
    run = runs[0] if runs else {"status": f"no run (exit {rc})", "metrics": {}}
    m = run["metrics"]
    return {
        "row": name,
        "command": f"python -m qpipe {cmd}",
        "status": run["status"],
        "exit_code": rc,
        "wall_s": wall,
        "error": run.get("tags", {}).get("qpipe.failure"),
        "decode_tok_s": m.get("perf.decode_tok_s"),
        "ttft_ms": m.get("perf.ttft_ms"),
        "est_peak_gb": m.get("mem.est_peak_gb"),
        "est_gpu_peak_gb": m.get("mem.est_gpu_peak_gb", m.get("mem.est_peak_gb")),
        "measured_peak_gb": m.get("mem.measured_peak_gb"),
        "est_error_pct": m.get("mem.est_error_pct"),
        "host_offloaded_gb": m.get("mem.host_offloaded_gb"),
        "est_offload_gb": m.get("mem.est_offload_gb"),
        "per_gpu": _per_gpu(m),
        "metrics": m,
    }


def _overlaps(runs: list[dict]) -> int:
    """Pairs of runs that held the same GPU at the same time."""
    bad = 0
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            same = a["tags"].get("qpipe.gpus") == b["tags"].get("qpipe.gpus")
            if same and a["start"] < b["end"] and b["start"] < a["end"]:
                bad += 1
    return bad


def _sweep(name: str, jobs: int, tag: str, logs: Path) -> dict:
    experiment = f"multi_device_{tag}_{_slug(name)}"
    seeds = ",".join(str(i) for i in range(jobs))
    args = ["--multirun", "hydra/launcher=joblib", *MODEL, *QUICK, f"seed={seeds}"]
    rc, wall, cmd = _qpipe(args, experiment, logs / f"{_slug(name)}.log")
    runs = _runs(experiment)
    return {
        "row": name,
        "command": f"python -m qpipe {cmd}",
        "jobs": jobs,
        "exit_code": rc,
        "wall_s": wall,
        "finished": sum(r["status"] == "FINISHED" for r in runs),
        "gpus": sorted(r["tags"].get("qpipe.gpus", "?") for r in runs),
        "same_gpu_overlaps": _overlaps(runs),
        "runs": [
            {k: r[k] for k in ("status", "start", "end", "tags")}
            | {"decode_tok_s": r["metrics"].get("perf.decode_tok_s")}
            for r in runs
        ],
    }


def _environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for lib in ("torch", "transformers", "accelerate", "hydra-joblib-launcher", "mlflow"):
        try:
            versions[lib] = md.version(lib)
        except md.PackageNotFoundError:
            versions[lib] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "gpu_count": len(gpus), "versions": versions}


def _fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# InternVL3.5-8B (random weights, bf16) beyond one GPU",
        "",
        f"Device: {', '.join(env['gpus']) or 'no GPU'} ({env['gpu_count']} visible); "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"Command: `{result['command']}`; each row's own command is in the JSON. "
        "Batch 1, 2048-token workload context (validate_vram), eval=quick; decode tok/s from "
        "qpipe's static-cache loop, eager (eval.decode=eager), 16 new tokens after 128.",
        "",
        "| row | status | GPU est. peak GB | GPU measured peak GB | error | host offload GB"
        " | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row.get("status") == "not run":
            lines.append(f"| {row['row']} | not run ({row['reason']}) | | | | | |")
            continue
        if "jobs" in row:
            continue
        lines.append(
            f"| {row['row']} | {row['status']} | {_fmt(row['est_gpu_peak_gb'])} | "
            f"{_fmt(row['measured_peak_gb'])} | {_fmt(row['est_error_pct'], '+.1f')} % | "
            f"{_fmt(row['host_offloaded_gb'])} | {_fmt(row['decode_tok_s'])} |"
        )
    per_gpu = [(r["row"], g) for r in result["rows"] for g in r.get("per_gpu", [])]
    if per_gpu:
        lines += [
            "",
            "Per GPU (allocator peak vs that GPU's share of the estimate; NVML's process view "
            "vs the estimate + CUDA context):",
            "",
            "| row | GPU | est. peak GB | measured GB | error | within ±5 % | NVML GB | "
            "est. total GB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, g in per_gpu:
            lines.append(
                f"| {name} | {g['gpu']} | {_fmt(g['est_peak_gb'])} | "
                f"{_fmt(g['measured_peak_gb'])} | {_fmt(g['est_error_pct'], '+.1f')} % | "
                f"{'yes' if g['within_5pct'] else 'NO'} | {_fmt(g['nvml_process_gb'])} | "
                f"{_fmt(g['est_total_gb'])} |"
            )
    sweeps = [r for r in result["rows"] if "jobs" in r]
    if sweeps:
        lines += [
            "",
            "| sweep | jobs finished | GPUs used | same-GPU overlaps | wall s |",
            "|---|---|---|---|---|",
        ]
        for s in sweeps:
            lines.append(
                f"| {s['row']} | {s['finished']}/{s['jobs']} | {', '.join(s['gpus'])} | "
                f"{s['same_gpu_overlaps']} | {s['wall_s']:.1f} |"
            )
    lines += ["", "Checks:", ""]
    lines += [f"- {k}: {v}" for k, v in result["checks"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = sys.argv[1:]
    if "--model" in args:  # a smoke test of the script itself, e.g. --model tiny_llama on CPU
        i = args.index("--model")
        MODEL[0] = f"model={args[i + 1]}"
        del args[i : i + 2]
    if len(args) != 1:
        sys.exit("usage: python bench/multi_device.py OUT_DIR [--model NAME]")
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "multi_device_logs"
    logs.mkdir(exist_ok=True)
    tag = time.strftime("%Y%m%d-%H%M%S")
    env = _environment()
    rows: list[dict] = []
    checks: dict[str, object] = {}

    # The reference first: it also writes the random checkpoint every later row reuses.
    on_gpu = _single("on-GPU (1 GPU, whole model)", [], tag, logs)
    offload = _single(
        f"offload (1 GPU capped at {CAP_GB} GB + host)",
        ["hardware.count=1", f"placement.max_memory_gb={CAP_GB}", "hardware.offload_gb=64"],
        tag,
        logs,
    )
    rows += [on_gpu, offload]
    _save(out, rows, checks, env)  # a device call may end before the 2-GPU rows
    checks["offload FINISHED"] = offload["status"] == "FINISHED"
    if offload["per_gpu"]:
        checks["offload GPU peak within ±5 % of its estimate"] = offload["per_gpu"][0][
            "within_5pct"
        ]
    if on_gpu["decode_tok_s"] and offload["decode_tok_s"]:
        checks["offload decode slowdown vs on-GPU (×)"] = round(
            on_gpu["decode_tok_s"] / offload["decode_tok_s"], 2
        )

    two_gpu_rows = [
        f"sharded (2 GPUs capped at {CAP_GB} GB)",
        "sweep: 1 job (reference wall time)",
        "sweep: 2 jobs on 2 GPUs",
        "sweep: 4 jobs on 2 GPUs",
    ]
    launcher = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
    if env["gpu_count"] >= 2:
        sharded = _single(
            two_gpu_rows[0],
            ["hardware.count=2", f"placement.max_memory_gb={CAP_GB}"],
            tag,
            logs,
        )
        rows.append(sharded)
        checks["sharded FINISHED"] = sharded["status"] == "FINISHED"
        checks["sharded: every GPU within ±5 %"] = bool(sharded["per_gpu"]) and all(
            g["within_5pct"] for g in sharded["per_gpu"]
        )
    if env["gpu_count"] >= 2 and not launcher:
        reason = "hydra-joblib-launcher is not installed (pip install hydra-joblib-launcher)"
        rows += [{"row": name, "status": "not run", "reason": reason} for name in two_gpu_rows[1:]]
    elif env["gpu_count"] >= 2:
        one = _sweep(two_gpu_rows[1], 1, tag, logs)
        two = _sweep(two_gpu_rows[2], 2, tag, logs)
        four = _sweep(two_gpu_rows[3], 4, tag, logs)
        rows += [one, two, four]
        checks["2 jobs: both FINISHED on their own GPU"] = (
            two["finished"] == 2 and len(set(two["gpus"])) == 2
        )
        checks["2 jobs: wall / 1 job (target ≤ 1.3)"] = round(two["wall_s"] / one["wall_s"], 2)
        checks["4 jobs: all FINISHED, never two on one GPU"] = (
            four["finished"] == 4 and four["same_gpu_overlaps"] == 0
        )
    else:
        reason = f"{env['gpu_count']} GPU visible; needs 2"
        rows += [{"row": name, "status": "not run", "reason": reason} for name in two_gpu_rows]

    print(_save(out, rows, checks, env))


def _save(out: Path, rows: list[dict], checks: dict, env: dict) -> str:
    result = {
        "command": " ".join(["python", "bench/multi_device.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "environment": env,
        "rows": rows,
        "checks": checks,
    }
    (out / "multi_device_h100.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "multi_device_h100.md").write_text(_markdown(result))
    return _markdown(result)


if __name__ == "__main__":
    main()
