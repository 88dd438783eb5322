"""``python -m qpipe.report``: compare finished runs from the MLflow store in one table, and
write them as JSON / markdown (how the README's result tables are made).

    python -m qpipe.report --experiment qpipe
    python -m qpipe.report --experiment gpu --json bench/results/x.json --markdown bench/results/x.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qpipe.tracking import default_tracking_uri

COLUMNS = (
    ("params.model", "model"),
    ("params.quant", "quant"),
    ("params.kernel", "kernel"),
    ("params.device", "device"),
    ("metrics.mem.est_weights_gb", "est weights GB"),
    ("metrics.mem.est_peak_gb", "est peak GB"),
    ("metrics.mem.measured_peak_gb", "measured peak GB"),
    ("metrics.mem.est_error_pct", "est error %"),
    ("metrics.quality.ppl", "ppl"),
    ("metrics.quality.ppl_delta_pct", "ppl Δ%"),  # the first eval domain
    ("metrics.quality.kld", "KL"),
    ("metrics.quality.top1_agree", "top-1"),
    ("metrics.quality.bleu_vs_baseline", "BLEU"),
    ("metrics.perf.ttft_ms", "TTFT ms"),
    ("metrics.perf.decode_tok_s", "decode tok/s"),
    ("metrics.time.quantize_s", "quantize s"),
)


def load_runs(
    experiment: str, tracking_uri: str | None = None, sweep: str | None = None
) -> list[dict[str, Any]]:
    """Every run of an experiment as a flat dict (params.*, metrics.*, tags.*), oldest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    query = f"tags.`qpipe.sweep` = '{sweep}'" if sweep else ""
    frame = mlflow.search_runs(
        experiment_names=[experiment], filter_string=query, order_by=["start_time ASC"]
    )
    return json.loads(frame.to_json(orient="records", date_format="iso"))


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def columns(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """COLUMNS plus, after the first eval domain's ppl, the other domains' (``quality.ppl.<name>``
    other than the one ``quality.ppl`` repeats) present in ``runs``."""
    prefix = "metrics.quality.ppl."
    names = sorted({k[len(prefix) :] for run in runs for k in run if k.startswith(prefix)})

    def is_first(name: str) -> bool:
        pairs = [(r.get(prefix + name), r.get("metrics.quality.ppl")) for r in runs]
        return all(a == b for a, b in pairs if a is not None)

    extra = []
    for name in (n for n in names if not is_first(n)):
        extra += [(prefix + name, f"ppl {name}"), (f"metrics.quality.ppl_delta_pct.{name}", "Δ%")]
    at = [key for key, _ in COLUMNS].index("metrics.quality.ppl_delta_pct") + 1
    return [*COLUMNS[:at], *extra, *COLUMNS[at:]]


def markdown(runs: list[dict[str, Any]]) -> str:
    cols = columns(runs)
    lines = ["| status | " + " | ".join(label for _, label in cols) + " |"]
    lines.append("|" + "---|" * (len(cols) + 1))
    for run in runs:
        cells = [_cell(run.get(key)) for key, _ in cols]
        lines.append(f"| {run.get('status')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(runs: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    out.add_column("status")
    cols = columns(runs)
    for _, label in cols:
        out.add_column(label, justify="right")
    for run in runs:
        out.add_row(run.get("status", ""), *(_cell(run.get(key)) for key, _ in cols))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qpipe.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default="qpipe")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--sweep", default=None, help="only the runs of this qpipe.sweep tag")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = load_runs(args.experiment, args.tracking_uri, args.sweep)
    Console().print(table(runs, f"qpipe runs · experiment {args.experiment}"))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(runs))


if __name__ == "__main__":
    main()
