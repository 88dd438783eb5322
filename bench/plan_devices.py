"""The memory budget's device plans for InternVL3.5-8B, offline (``pipeline=estimate``: the
config alone, meta device, no weights). Estimates, not measurements: bench/multi_device.py
measures the same plans on GPUs.

    python bench/plan_devices.py OUT_DIR     # writes OUT_DIR/multi_device_plan.{json,md}
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ["model=internvl", "model.weights=random", "pipeline=estimate"]
SCENARIOS = {
    "bf16 on 2 × RTX 4090 24 GB": ["hardware=rtx4090_24gb", "hardware.count=2"],
    "bf16 on 2 × RTX 3060 12 GB": ["hardware=rtx3060_12gb", "hardware.count=2"],
    "bf16 on 2 × RTX 4060 8 GB": ["hardware=rtx4060_8gb", "hardware.count=2"],
    "bf16 on 3 × RTX 4060 8 GB": ["hardware=rtx4060_8gb", "hardware.count=3"],
    "bf16 on 1 H100 capped at 12 GB + 64 GB host": [
        "hardware=h100_80gb",
        "placement.max_memory_gb=12",
        "hardware.offload_gb=64",
    ],
    "bf16 on 2 H100 capped at 12 GB": [
        "hardware=h100_80gb",
        "hardware.count=2",
        "placement.max_memory_gb=12",
    ],
    "GPTQ W4 quantized on 1 RTX 3060 12 GB": ["hardware=rtx3060_12gb", "quant=gptq"],
    "AWQ W4 quantized on 1 RTX 3060 12 GB": ["hardware=rtx3060_12gb", "quant=awq"],
}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/plan_devices.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QPIPE_OUTPUTS", str(Path(tempfile.gettempdir()) / "qpipe-plan"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    from qpipe.app import run_pipeline
    from tests.conftest import compose_config

    rows = []
    for name, overrides in SCENARIOS.items():
        args = [*BASE, *overrides]
        report = run_pipeline(compose_config(*args), Path(tempfile.mkdtemp()) / "run")
        budget = report.results["memory_budget"].outputs
        rows.append(
            {
                "scenario": name,
                "command": "python -m qpipe " + " ".join(args),
                "status": report.status,
                "verdict": budget.get("verdict"),
                "error": report.error,
                "estimate_total_gb": budget["estimate"]["total_gb"],
                "placement": budget.get("placement"),
                "quantize": budget.get("quantize"),
            }
        )
    versions = {lib: md.version(lib) for lib in ("torch", "transformers", "accelerate")}
    result = {
        "command": f"python bench/plan_devices.py {sys.argv[1]}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()} CPU (estimates only: no GPU is used)",
        "versions": versions,
        "rows": rows,
    }
    (out / "multi_device_plan.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [
        "# InternVL3.5-8B device plans (estimates, offline)",
        "",
        f"`{result['command']}` on {result['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ". Batch 1 × 2048 tokens. GB = 1e9 bytes; a GPU's total adds its CUDA context.",
        "",
        "| scenario | verdict | per GPU: weights / est. total / usable GB | host offload GB |",
        "|---|---|---|---|",
    ]
    for row in rows:
        p = row["placement"]
        per = "one card"
        host = "—"
        if p:
            per = "; ".join(
                f"{d['device']} {d['weights_gb']:.2f} / {d['total_gb']:.2f} / {d['usable_gb']:.2f}"
                for d in p["devices"]
                if d["device"] != "cpu"
            )
            host = f"{p['offloaded_gb']:.2f}" if p["offloaded_gb"] else "—"
        verdict = row["verdict"] or row["error"]
        lines.append(f"| {row['scenario']} | {verdict} | {per} | {host} |")
    quant = [r for r in rows if r["quantize"]]
    if quant:
        lines += [
            "",
            "| quantizing | how | GPU GB | whole model on the GPU would need GB |",
            "|---|---|---|---|",
        ]
        for r in quant:
            q = r["quantize"]
            how = "layer by layer" if q["layer_by_layer"] else "whole model"
            lines.append(
                f"| {r['scenario']} | {how} ({q['onload']['largest_subgraph']}: "
                f"{q['onload']['subgraph_weights_gb']:.2f} GB weights, "
                f"{q['onload']['hessians_gb']:.2f} GB Hessians, "
                f"{q['onload']['cached_outputs_gb']:.2f} GB cached outputs) | "
                f"{q['gpu_gb']:.2f} | {q['whole_model_gb']:.2f} |"
            )
    (out / "multi_device_plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
