"""quant=auto and sensitivity-ranked exclusion on SmolLM2-135M (real weights, CPU).

Runs qpipe's own stages (env_check → sensitivity → memory_budget → exclude_layers → pad_align
→ quantize → load, ``bench/auto_dag.yaml``) for each option, then scores the loaded model
with the benchmark's perplexity harness. Writes ``<out>/auto_smollm2.{json,md}``.

    nice -n 10 python bench/auto_smollm2.py --out bench/results

Options (all RTN/GPTQ at 4 bits, group 64, asymmetric, unless said):
- none (fp32), rtn, gptq: uniform baselines;
- auto (gptq / rtn rounding) at a weights budget halfway between uniform 4- and 8-bit weights;
- rtn keeping the top 5 % most sensitive Linears in fp32 vs rtn keeping as many chosen by a
  name rule (down_proj of the first and last five blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qpipe.app import run_pipeline
from qpipe.backends import get_backend
from qpipe.config.compose import CONF_DIR, normalize_overrides, resolve_device, resolve_dtype
from qpipe.corpora.texts import read_text, token_ids
from qpipe.evaluation.harness import perplexity
from qpipe.models import load_tokenizer

HERE = Path(__file__).resolve().parent
DAG = HERE / "auto_dag.yaml"
CALIB = "calib.num_samples=16"  # GPTQ: 16 x 256 calibration tokens (both GPTQ options)
RULE = r"model\.layers\.([0-4]|2[5-9])\.mlp\.down_proj"  # 10 layers: first and last 5 blocks


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)))


def estimate_weights_gb(*overrides: str) -> float:
    cfg = compose_config(*overrides, "pipeline=estimate", "mlflow.experiment=auto-bench")
    report = run_pipeline(cfg, Path(cfg_dir()) / f"est-{time.time_ns()}")
    return float(report.metrics["mem.est_weights_gb"])


def cfg_dir() -> Path:
    path = Path("outputs") / "bench-auto"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_option(label: str, *overrides: str) -> dict:
    cfg = compose_config(
        *overrides, f"pipeline={DAG}", "mlflow.experiment=auto-bench", "eval.max_tokens=2048"
    )
    start = time.perf_counter()
    report = run_pipeline(cfg, cfg_dir() / label)
    if report.status != "FINISHED":
        raise SystemExit(f"{label}: {report.failed_stage}: {report.error}")
    # The runner drops live objects at the end of a run: load the checkpoint it wrote, as the
    # load stage did.
    loaded = report.results["load"].outputs
    model = get_backend(cfg.quant.method).load(
        Path(loaded["checkpoint"]),
        cfg.model.get("model_class", "AutoModelForCausalLM"),
        loaded["device"],
        resolve_dtype(cfg, loaded["device"]),
        loaded["kernel"],
    )
    tokenizer = load_tokenizer(cfg.model)
    ids = token_ids(tokenizer, read_text(cfg.eval.text), int(cfg.eval.max_tokens))
    ppl = perplexity(model, ids, int(cfg.eval.window), resolve_device(cfg))
    m = report.metrics
    row = {
        "option": label,
        "overrides": list(overrides),
        "ppl": ppl,
        "est_weights_gb": m["mem.est_weights_gb"],
        "loaded_weights_gb": m["mem.loaded_weights_gb"],
        "weights_error_pct": 100 * (m["mem.loaded_weights_gb"] / m["mem.est_weights_gb"] - 1),
        "quantize_s": m.get("time.quantize_s"),
        "seconds": time.perf_counter() - start,
        "skipped_linears": m.get("exclude.skipped"),
    }
    for key in ("auto.layers_4bit", "auto.layers_8bit", "auto.layers_16bit", "auto.budget_gb"):
        if key in m:
            row[key] = m[key]
    if "sensitivity" in report.results and report.results["sensitivity"].outputs.get("measured"):
        out = report.results["sensitivity"].outputs
        row["sensitivity_tokens"] = out["tokens"]
        row["sensitivity_s"] = m.get("time.sensitivity_s")
    budget = report.results["memory_budget"]
    if "bit_plan" in budget.outputs:
        row["bit_plan"] = budget.outputs["bit_plan"]["bits"]
        row["plan_weights_gb"] = budget.outputs["estimate"]["weights_gb"]
        for art in budget.artifacts:
            if art.name in ("bit_plan.png", "bit_plan.md"):
                row.setdefault("_artifacts", []).append(str(art))
    exclude = report.results["exclude_layers"].outputs
    row["kept_by_rule_or_sensitivity"] = sorted(
        n for n, r in exclude["skip"].items() if r.startswith(("exclude.by", "exclude.patterns"))
    )
    sens = report.results.get("sensitivity")
    if sens is not None and sens.outputs.get("measured"):
        row["_sensitivity"] = sens.outputs["layers"]
        row["_sensitivity_png"] = [str(a) for a in sens.artifacts]
    print(f"{label}: ppl {ppl:.3f}, weights {row['loaded_weights_gb']:.4f} GB", flush=True)
    return row


def prior_agreement(sensitivity: dict) -> float:
    """Spearman rank correlation of the size prior (what pipeline=estimate plans with) with
    the measured KL per layer."""
    import numpy as np

    from qpipe.evaluation.layer_kl import prior_sensitivity
    from qpipe.memory import build_inventory
    from qpipe.models import load_config

    cfg = compose_config()
    inventory = build_inventory(load_config(cfg.model), cfg.model.model_class)
    names = sorted(sensitivity)
    prior = prior_sensitivity(inventory, names)

    def ranks(values: list[float]) -> np.ndarray:
        return np.argsort(np.argsort(values)).astype(float)

    a = ranks([prior[n]["kl"] for n in names])
    b = ranks([sensitivity[n]["kl"] for n in names])
    return float(np.corrcoef(a, b)[0, 1])


def options(budget: float, k: int) -> dict[str, tuple[str, ...]]:
    """key -> (label, overrides...), in report order."""
    return {
        "none": ("none (fp32)", "quant=none"),
        "rtn": ("rtn", "quant=rtn"),
        "gptq": ("gptq", "quant=gptq", CALIB),
        "auto_gptq": ("auto (gptq)", "quant=auto", f"quant.weights_gb={budget}", CALIB),
        "auto_rtn": (
            "auto (rtn)",
            "quant=auto",
            "quant.algorithm=rtn",
            f"quant.weights_gb={budget}",
        ),
        "topk": (
            f"rtn + top-{k} sensitive in fp32",
            "quant=rtn",
            "exclude.by=sensitivity",
            f"exclude.keep_top_k={k}",
        ),
        "rule": (f"rtn + {k} by name rule in fp32", "quant=rtn", f"exclude.patterns=['{RULE}']"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated option keys (default: all)")
    parser.add_argument("--merge", action="store_true", help="only write the report from rows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.out / "auto_smollm2.rows"
    parts.mkdir(exist_ok=True)
    torch.manual_seed(0)

    w4 = estimate_weights_gb("quant=rtn")
    w8 = estimate_weights_gb("quant=rtn", "quant.bits=8", "kernel=hf")
    budget = round((w4 + w8) / 2, 4)
    k = round(0.05 * 210)
    table = options(budget, k)
    if not args.merge:
        for key in args.only.split(",") if args.only else table:
            row = run_option(*table[key])
            (parts / f"{key}.json").write_text(json.dumps(row))
        if args.only:
            return
    rows = []
    for key in table:  # options not run (yet) are left out of the report, and listed
        if (parts / f"{key}.json").is_file():
            rows.append({"key": key, **json.loads((parts / f"{key}.json").read_text())})
    missing = [key for key in table if not (parts / f"{key}.json").is_file()]
    sensitivity = next(r["_sensitivity"] for r in rows if "_sensitivity" in r)
    for r in rows:
        for src in r.pop("_artifacts", []):
            shutil.copy(src, args.out / f"auto_smollm2_{r['key']}_{Path(src).name}")
        for src in r.pop("_sensitivity_png", []):
            shutil.copy(src, args.out / "auto_smollm2_sensitivity.png")
        r.pop("_sensitivity", None)
    record = {
        "what": "quant=auto and sensitivity-ranked exclusion, SmolLM2-135M-Instruct, real weights",
        "command": "nice -n 10 python bench/auto_smollm2.py --out bench/results (or in parts: "
        "--only KEY,KEY... then --merge)",
        "load_average": os.getloadavg()[0],
        "device": {
            "kind": "cpu",
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            p: version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")
        }
        | {"python": sys.version.split()[0]},
        "eval": "perplexity over 2048 tokens of the GPL-3 text, 1024-token windows, fp32",
        "uniform_weights_gb": {"rtn4_g64": w4, "rtn8_g64": w8},
        "weights_budget_gb": budget,
        "keep_k": k,
        "name_rule": RULE,
        "rows": rows,
        "not_run": missing,
        "sensitivity": sensitivity,
        "prior_vs_measured_spearman": prior_agreement(sensitivity),
    }
    (args.out / "auto_smollm2.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "auto_smollm2.md").write_text(markdown(record))
    print(markdown(record))


def markdown(rec: dict) -> str:
    lines = [
        "# quant=auto on SmolLM2-135M (CPU, real weights)",
        "",
        f"`{rec['command']}` — {rec['device']['processor']}, {rec['device']['threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in rec["versions"].items()),
        "",
        f"{rec['eval']}. 4-bit = group 64, asymmetric. Weights budget for auto: "
        f"{rec['weights_budget_gb']} GB, halfway between uniform 4-bit "
        f"({rec['uniform_weights_gb']['rtn4_g64']:.4f} GB) and uniform 8-bit "
        f"({rec['uniform_weights_gb']['rtn8_g64']:.4f} GB) weights (estimates).",
        "",
        "| option | ppl | plan/est weights GB | loaded weights GB | loaded vs est | layers 4/8/16 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        counts = (
            f"{r['auto.layers_4bit']:.0f}/{r['auto.layers_8bit']:.0f}/{r['auto.layers_16bit']:.0f}"
            if "auto.layers_4bit" in r
            else ""
        )
        lines.append(
            f"| {r['option']} | {r['ppl']:.3f} | {r['est_weights_gb']:.4f} | "
            f"{r['loaded_weights_gb']:.4f} | {r['weights_error_pct']:+.2f} % | {counts} |"
        )
    if rec.get("not_run"):
        lines += ["", "Not run (yet): " + ", ".join(rec["not_run"]) + "."]
    sens_row = next((r for r in rec["rows"] if "sensitive" in r["option"]), None)
    rule_row = next((r for r in rec["rows"] if "name rule" in r["option"]), None)
    if sens_row is None or rule_row is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Kept by sensitivity (top {rec['keep_k']}): "
        + ", ".join(sens_row["kept_by_rule_or_sensitivity"]),
        "",
        f"Kept by the name rule `{rec['name_rule']}`: "
        + ", ".join(rule_row["kept_by_rule_or_sensitivity"]),
        "",
    ]
    if "prior_vs_measured_spearman" in rec:
        lines += [
            "Rank correlation (Spearman) of the size prior that `pipeline=estimate` plans with "
            f"and the measured KL: {rec['prior_vs_measured_spearman']:.2f}.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
