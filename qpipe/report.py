"""``python -m qpipe.report``: the comparison of runs — an experiment, a sweep (its MLflow parent
run) — as a table, and as CSV / Markdown / HTML / a Pareto plot. A multirun's parent run holds
the same files, made by the same functions, refreshed as its jobs finish.

    python -m qpipe.report                              # the latest sweep of experiment qpipe
    python -m qpipe.report --experiment qpipe --all     # every run of the experiment
    python -m qpipe.report --sweep 16-02-11 --out bench/results/x   # x.csv/.md/.html/.png
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qpipe.pareto import Point, pareto_plot
from qpipe.tracking import default_tracking_uri

PARENT_ROLE = "parent"  # tags.qpipe.role of a sweep's parent run

COLUMNS = (
    ("tags.mlflow.runName", "run"),
    ("params.model", "model"),
    ("params.quant", "quant"),
    ("params.quant.bits", "bits"),
    ("params.kernel", "kernel"),
    ("params.device", "device"),
    ("metrics.mem.est_weights_gb", "est weights GB"),
    ("metrics.mem.loaded_weights_gb", "loaded weights GB"),
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
    ("tags.qpipe.failure", "failure"),
)


def _client_uri(tracking_uri: str | None) -> str:
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def load_runs(
    experiment: str,
    tracking_uri: str | None = None,
    sweep: str | None = None,
    parent: str | None = None,
) -> list[dict[str, Any]]:
    """Runs as flat dicts (params.*, metrics.*, tags.*), oldest first, parents left out: every
    run of ``experiment``, or the children of one sweep (by ``qpipe.sweep`` tag or parent id)."""
    import mlflow

    _client_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        return []
    query = ""
    if parent:
        query = f"tags.`mlflow.parentRunId` = '{_quote(parent)}'"
    elif sweep:
        query = f"tags.`qpipe.sweep` = '{_quote(sweep)}'"
    frame = mlflow.search_runs(
        experiment_names=[experiment], filter_string=query, order_by=["start_time ASC"]
    )
    runs = json.loads(frame.to_json(orient="records", date_format="iso"))
    return [r for r in runs if r.get("tags.qpipe.role") != PARENT_ROLE]


def latest_sweep(experiment: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The most recent sweep parent run of ``experiment`` (None when there is none)."""
    import mlflow

    _client_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        return None
    frame = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`qpipe.role` = '{PARENT_ROLE}'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    runs = json.loads(frame.to_json(orient="records", date_format="iso"))
    return runs[0] if runs else None


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ")


def rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One row per run: status, then the columns (every eval domain present)."""
    cols = columns(runs)
    return [[str(r.get("status"))] + [_cell(r.get(key)) for key, _ in cols] for r in runs]


def header(runs: list[dict[str, Any]]) -> list[str]:
    return ["status"] + [label for _, label in columns(runs)]


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
    lines = ["| " + " | ".join(header(runs)) + " |", "|" + "---|" * len(header(runs))]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows(runs)]
    return "\n".join(lines) + "\n"


def csv_text(runs: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_id", *header(runs)])
    for run, row in zip(runs, rows(runs), strict=True):
        writer.writerow([run.get("run_id"), *row])
    return out.getvalue()


def html_table(runs: list[dict[str, Any]], title: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header(runs))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows(runs)
    )
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse;font:13px sans-serif}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}</style>"
        f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>\n"
    )


def label(run: dict[str, Any], with_model: bool = False) -> str:
    """``gptq w3``, ``bnb_nf4``, ``none``: what a point on the Pareto plot is."""
    name = str(run.get("params.quant") or run.get("tags.mlflow.runName") or run.get("run_id"))
    if run.get("params.quant.method") in ("gptq", "awq", "rtn"):
        name += f" w{run.get('params.quant.bits')}"
    return f"{run.get('params.model')}/{name}" if with_model else name


def points(runs: list[dict[str, Any]]) -> list[Point]:
    """Finished runs with a measured peak and a perplexity Δ, as Pareto points."""
    done = [r for r in runs if r.get("status") == "FINISHED"]
    several_models = len({r.get("params.model") for r in done}) > 1
    return [
        Point(
            label(r, several_models),
            r["metrics.mem.measured_peak_gb"],
            r["metrics.quality.ppl_delta_pct"],
            r.get("metrics.perf.decode_tok_s"),
        )
        for r in done
        if r.get("metrics.mem.measured_peak_gb") is not None
        and r.get("metrics.quality.ppl_delta_pct") is not None
    ]


def write_comparison(runs: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """comparison.{csv,md,html} and pareto.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "comparison.csv": csv_text(runs),
        "comparison.md": f"# {title}\n\n" + markdown(runs),
        "comparison.html": html_table(runs, title),
    }
    out = []
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        out.append(folder / name)
    out.append(pareto_plot(points(runs), folder / "pareto.png", title))
    return out


def table(runs: list[dict[str, Any]], title: str) -> Table:
    out = Table(title=title)
    for name in header(runs):
        out.add_column(name, justify="right")
    for row in rows(runs):
        out.add_row(*row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qpipe.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default="qpipe")
    parser.add_argument("--tracking-uri", default=None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sweep", default=None, help="the runs of this qpipe.sweep tag")
    which.add_argument("--parent", default=None, help="the children of this parent run id")
    which.add_argument("--all", action="store_true", help="every run of the experiment")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.csv/.md/.html/.png")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    title = f"experiment {args.experiment}"
    parent = args.parent
    if not (args.sweep or parent or args.all):
        latest = latest_sweep(args.experiment, args.tracking_uri)
        parent = latest["run_id"] if latest else None
        if latest:
            title = f"sweep {latest.get('tags.qpipe.sweep')} · {title}"
    runs = load_runs(args.experiment, args.tracking_uri, args.sweep, parent)
    if args.sweep:
        title = f"sweep {args.sweep} · {title}"
    Console(width=250).print(table(runs, f"qpipe · {title}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for path in write_comparison(runs, Path(tmp), title):
                target = args.out.with_suffix(path.suffix)
                target.write_bytes(path.read_bytes())
                print(f"wrote {target}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(runs))


if __name__ == "__main__":
    main()
