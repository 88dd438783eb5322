"""Write sweeps' results as committed files: <out>.json (commands, machine, library versions,
every run's params and metrics), <out>.md (the table the README quotes) and <out>_pareto.png.
Each ``--sweep`` names a store, an experiment (its latest sweep is taken) and the command.

    python bench/sweep_results.py --out bench/results/bits_smollm2 \
        --sweep sqlite:///outputs/mlflow.db bits_smollm2 "python -m qpipe +sweep=bits ..."
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from qpipe.devices.envinfo import library_versions
from qpipe.report import latest_sweep, load_runs, write_comparison

TABLE = (
    ("params.quant", "quant", None),
    ("params.quant.bits", "bits", None),
    ("params.kernel", "kernel", None),
    ("metrics.quality.ppl", "ppl", "{:.2f}"),
    ("metrics.quality.ppl_delta_pct", "Δ ppl %", "{:+.1f}"),
    ("metrics.mem.est_weights_gb", "est weights GB", "{:.3f}"),
    ("metrics.mem.loaded_weights_gb", "loaded weights GB", "{:.3f}"),
    ("metrics.mem.measured_peak_gb", "measured peak GB (host RSS)", "{:.3f}"),
    ("metrics.perf.decode_tok_s", "decode tok/s", "{:.2f}"),
    ("metrics.time.quantize_s", "quantize s", "{:.1f}"),
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cell(value: object, fmt: str | None) -> str:
    if value is None:
        return "—"
    return fmt.format(float(value)) if fmt else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--sweep",
        nargs=3,
        action="append",
        required=True,
        metavar=("TRACKING_URI", "EXPERIMENT", "COMMAND"),
    )
    args = parser.parse_args()
    sweeps, runs = [], []
    for uri, experiment, command in args.sweep:
        parent = latest_sweep(experiment, uri)
        if parent is None:
            raise SystemExit(f"no sweep in experiment {experiment!r} of {uri}")
        found = load_runs(experiment, uri, parent=parent["run_id"])
        sweeps.append(
            {
                "command": command,
                "experiment": experiment,
                "sweep": parent.get("tags.qpipe.sweep"),
                "parent_run": parent["run_id"],
                "parent_status": parent.get("status"),
                "jobs": len(found),
            }
        )
        runs += found
    runs.sort(key=lambda r: (str(r.get("params.quant")), int(r.get("params.quant.bits") or 0)))
    machine = {
        "device": "cpu",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "note": "2 CPU cores shared with other jobs: times are indicative only",
    }
    record = {
        "sweeps": sweeps,
        "machine": machine,
        "versions": library_versions(),
        "runs": [
            {
                k: v
                for k, v in r.items()
                if k.startswith(("params.", "metrics.", "status", "run_id"))
            }
            for r in runs
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {args.out.name}", ""]
    for sw in sweeps:
        lines.append(f"- `{sw['command']}` (sweep {sw['sweep']}, {sw['jobs']} jobs)")
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['note']}). "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "",
        "Unquantized (fp32) perplexity on the same tokens: "
        + ", ".join(sorted({cell(r.get("metrics.quality.baseline_ppl"), "{:.2f}") for r in runs})),
        "",
        "| " + " | ".join(label for _, label, _ in TABLE) + " |",
        "|" + "---|" * len(TABLE),
    ]
    for r in runs:
        if r.get("status") != "FINISHED":
            continue
        lines.append("| " + " | ".join(cell(r.get(k), f) for k, _, f in TABLE) + " |")
    failed = [r for r in runs if r.get("status") != "FINISHED"]
    for r in failed:
        lines.append(
            f"\n{r.get('tags.mlflow.runName')}: {r.get('status')} {r.get('tags.qpipe.failure')}"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        title = " + ".join(f"sweep {sw['sweep']}" for sw in sweeps)
        files = write_comparison(runs, Path(tmp), f"{args.out.name}: {title}")
        png = next(f for f in files if f.suffix == ".png")
        shutil.copy(png, args.out.parent / f"{args.out.name}_pareto.png")
    print(f"wrote {args.out}.json, .md, _pareto.png")


if __name__ == "__main__":
    main()
