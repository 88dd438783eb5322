"""quant=auto plans for InternVL3.5-8B on 8, 12 and 16 GB cards, from the config alone
(``pipeline=estimate``, ``model.weights=random``, offline). Writes
``<out>/auto_internvl_plans.{json,md}`` and each card's per-layer picture.

    python bench/auto_internvl_plans.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

from hydra import compose, initialize_config_dir

from qpipe.app import run_pipeline
from qpipe.config.compose import CONF_DIR, normalize_overrides

CARDS = ("rtx4060_8gb", "rtx3060_12gb", "t4_16gb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for card in CARDS:
        overrides = [
            "model=internvl",
            "model.weights=random",
            "quant=auto",
            "pipeline=estimate",
            f"hardware={card}",
            "mlflow.experiment=auto-bench",
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=normalize_overrides(overrides))
        report = run_pipeline(cfg, Path("outputs") / "bench-auto" / f"internvl-{card}")
        if report.status != "FINISHED":
            raise SystemExit(f"{card}: {report.error}")
        out = report.results["memory_budget"].outputs
        plan = out["bit_plan"]
        for art in report.results["memory_budget"].artifacts:
            if art.name == "bit_plan.png":
                shutil.copy(art, args.out / f"auto_internvl_{card}.png")
        rows.append(
            {
                "hardware": card,
                "capacity_gb": out["capacity_gb"],
                "usable_gb": out["usable_gb"],
                "est_total_gb": out["estimate"]["total_gb"],
                "est_weights_gb": out["estimate"]["weights_gb"],
                "kv_cache_gb": out["estimate"]["kv_cache_gb"],
                "activations_gb": out["estimate"]["activations_gb"],
                "runtime_gb": out["estimate"]["runtime_gb"],
                "fits": out["fits"],
                "layers": plan["counts"],
                "sensitivity_source": plan["sensitivity_source"],
                "bits": plan["bits"],
            }
        )
    record = {
        "what": "quant=auto plans, InternVL3.5-8B (config only), batch 1 x 2048 tokens, bf16",
        "command": "python bench/auto_internvl_plans.py --out bench/results",
        "versions": {p: version(p) for p in ("torch", "transformers")}
        | {"python": sys.version.split()[0]},
        "rows": rows,
    }
    (args.out / "auto_internvl_plans.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# quant=auto plans for InternVL3.5-8B (pipeline=estimate, random weights, offline)",
        "",
        f"`{record['command']}` — {record['what']}; vision tower, projector and lm_head stay "
        "bf16 by the name rules; the size prior stands in for measured sensitivity.",
        "",
        "| hardware | usable GB | est total GB | weights GB | KV GB | LM Linears 4 / 8 / 16 bit | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["layers"]
        lines.append(
            f"| {r['hardware']} | {r['usable_gb']:.2f} | {r['est_total_gb']:.2f} | "
            f"{r['est_weights_gb']:.2f} | {r['kv_cache_gb']:.2f} | "
            f"{c.get('4', 0)} / {c.get('8', 0)} / {c.get('16', 0)} | {r['fits']} |"
        )
    (args.out / "auto_internvl_plans.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
