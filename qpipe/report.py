"""``python -m qpipe.report``: the comparison of runs — the latest sweep (its MLflow parent
run), one sweep, or every run of an experiment — as a table as wide as the terminal, ending
with a one-line verdict (which runs no other beats on memory and quality, and the best on
memory, quality and speed); and as CSV / Markdown / HTML / a Pareto plot, every column whole.
A multirun's parent run holds the same files, made by the same functions, refreshed as its
jobs finish.

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
from rich.markup import escape
from rich.table import Table

from qpipe.backends import option_label
from qpipe.plots.pareto import Point, pareto_front, pareto_plot
from qpipe.tracking.runs import default_tracking_uri

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
    """``gptq-w3``, ``bnb_nf4``, ``none`` (as in the run's name): what a point on the Pareto
    plot is."""
    name = str(run.get("params.quant") or run.get("tags.mlflow.runName") or run.get("run_id"))
    name = option_label(name, run.get("params.quant.method"), run.get("params.quant.bits"))
    return f"{run.get('params.model')}/{name}" if with_model else name


def random_weights(run: dict[str, Any]) -> bool:
    """The run measured a model with random weights: its quality numbers are noise."""
    return run.get("params.model.weights") == "random"


def points(runs: list[dict[str, Any]]) -> list[Point]:
    """Finished runs with a measured peak and a perplexity Δ, as Pareto points (runs with
    random weights left out: their perplexity is noise)."""
    done = [r for r in runs if r.get("status") == "FINISHED" and not random_weights(r)]
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


# What the terminal shows first when it has no room for every column (the CSV/HTML hold all).
TERMINAL_ORDER = (
    "status",
    "run",
    "failure",
    "measured peak GB",
    "ppl Δ%",
    "decode tok/s",
    "est peak GB",
    "ppl",
    "KL",
    "top-1",
    "quantize s",
    "loaded weights GB",
    "est weights GB",
    "est error %",
    "TTFT ms",
    "BLEU",
    "kernel",
    "device",
    "model",
    "quant",
    "bits",
)
QUALITY_LABELS = ("ppl", "ppl Δ%", "KL", "top-1", "BLEU", "Δ%")
ERROR_MIN = 24  # the failure column gets at least this many characters (a third of a wide
# terminal), or is left out


def short_error(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters (the full text is in the CSV and HTML)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: max(limit - 1, 0)] + "…"


def _terminal_cells(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for the terminal: run names without the model when there is one model,
    quality cells of random-weight runs as ``noise``, columns no run fills left out."""
    head, body = header(runs), rows(runs)
    models = {r.get("params.model") for r in runs}
    at = head.index("run")
    for run, row in zip(runs, body, strict=True):
        if len(models) == 1 and row[at].startswith(f"{run.get('params.model')}/"):
            row[at] = row[at].split("/", 1)[1]
        if random_weights(run):
            for i, name in enumerate(head):
                if name.startswith(QUALITY_LABELS) and row[i] != "—":
                    row[i] = "noise"
    # Columns no run fills (or only with noise) are left out; the verdict says why.
    keep = [i for i, name in enumerate(head) if any(row[i] not in ("—", "noise") for row in body)]
    return [head[i] for i in keep], [[row[i] for i in keep] for row in body]


def _rank(name: str) -> int:
    if name.startswith("ppl ") and name != "ppl Δ%":  # other eval domains, after the first
        return TERMINAL_ORDER.index("ppl") + 1
    return TERMINAL_ORDER.index(name) if name in TERMINAL_ORDER else len(TERMINAL_ORDER)


def _two_lines(name: str) -> str:
    """A header on at most two lines, split where its longer line is shortest."""
    words = name.split()
    if len(words) < 2:
        return name
    splits = [(" ".join(words[:k]), " ".join(words[k:])) for k in range(1, len(words))]
    top, bottom = min(splits, key=lambda pair: max(len(pair[0]), len(pair[1])))
    return f"{top}\n{bottom}" if max(len(top), len(bottom)) < len(name) else name


def _need(head: list[str], body: list[list[str]], i: int) -> int:
    """Characters column ``i`` takes: its widest cell or header line, padding and a border."""
    lines = _two_lines(head[i]).split("\n")
    return max([len(row[i]) for row in body] + [len(line) for line in lines]) + 3


def _error_min(width: int) -> int:
    return max(ERROR_MIN, width // 3)


def _fit(head: list[str], body: list[list[str]], width: int) -> list[int]:
    """Indices of the columns that fit ``width`` characters, by ``TERMINAL_ORDER``; a header
    may wrap onto two lines, a cell never does; a failure gets at least ``ERROR_MIN``."""
    chosen, used = [], 1
    order = sorted(range(len(head)), key=lambda i: (_rank(head[i]), i))
    for i in order:
        need = _error_min(width) + 3 if head[i] == "failure" else _need(head, body, i)
        if used + need <= width:
            chosen.append(i)
            used += need
    return sorted(chosen, key=lambda i: (head[i] == "failure", _rank(head[i]), i))


def table(runs: list[dict[str, Any]], title: str, width: int = 250) -> tuple[Table, list[str]]:
    """The comparison as wide as ``width``; and the labels of the columns left out."""
    head, body = _terminal_cells(runs)
    keep = _fit(head, body, width)
    out = Table(title=title, title_justify="left")
    failure = head.index("failure") if "failure" in head else None
    room = width - 1 - sum(_need(head, body, i) for i in keep if i != failure) - 3
    for i in keep:
        name = head[i]
        if i == failure:
            out.add_column(name, justify="left", no_wrap=True, max_width=room)
        else:
            justify = "left" if name in ("run", "status") else "right"
            out.add_column(_two_lines(name), justify=justify, no_wrap=True)
    for row in body:
        cells = [short_error(row[i], room) if i == failure else row[i] for i in keep]
        out.add_row(*(escape(c) for c in cells))
    return out, [head[i] for i in range(len(head)) if i not in keep]


def verdict(runs: list[dict[str, Any]]) -> str:
    """One line: the Pareto front of measured peak memory against perplexity loss, and the
    best run on memory, quality and decode speed."""
    several = len({r.get("params.model") for r in runs}) > 1
    done = [r for r in runs if r.get("status") == "FINISHED"]
    pts = points(runs)
    parts = []
    memory = [r for r in done if r.get("metrics.mem.measured_peak_gb") is not None]
    if memory:
        best = min(
            memory,
            key=lambda r: (
                r["metrics.mem.measured_peak_gb"],
                r.get("metrics.quality.ppl_delta_pct") or 0.0,
            ),
        )
        parts.append(
            f"memory {label(best, several)} ({best['metrics.mem.measured_peak_gb']:.3g} GB)"
        )
    if pts:
        best_q = min(pts, key=lambda p: p.quality_loss)
        parts.append(f"quality {best_q.label} ({best_q.quality_loss:+.1f} %)")
    speed = [r for r in done if r.get("metrics.perf.decode_tok_s") is not None]
    if speed:
        best = max(speed, key=lambda r: r["metrics.perf.decode_tok_s"])
        parts.append(
            f"speed {label(best, several)} ({best['metrics.perf.decode_tok_s']:.3g} tok/s)"
        )
    if not parts:
        return "verdict: no finished run with measurements yet"
    line = "best: " + " · ".join(parts)
    if pts:
        line += " · Pareto front: " + ", ".join(pts[i].label for i in pareto_front(pts))
    noise = sum(random_weights(r) for r in done)
    if noise:
        line += f"; quality ignored for {noise} random-weight runs"
    return line


def main(argv: list[str] | None = None, console: Console | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qpipe.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", default="qpipe", help="MLflow experiment (default qpipe)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: sqlite under outputs/)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sweep", default=None, help="the runs of this qpipe.sweep tag")
    which.add_argument("--parent", default=None, help="the children of this parent run id")
    which.add_argument("--all", action="store_true", help="every run of the experiment")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.csv/.md/.html/.png")
    parser.add_argument(
        "--json", type=Path, default=None, help="write the runs (every param/metric) as JSON"
    )
    parser.add_argument(
        "--markdown", type=Path, default=None, help="write the whole table as Markdown"
    )
    args = parser.parse_args(argv)
    console = console or Console()
    what = f"every run of experiment {args.experiment}"
    parent = args.parent
    if args.sweep:
        what = f"sweep {args.sweep} of experiment {args.experiment}"
    elif parent:
        what = f"the sweep of parent run {parent}"
    elif not args.all:
        latest = latest_sweep(args.experiment, args.tracking_uri)
        parent = latest["run_id"] if latest else None
        if latest:
            axes = latest.get("tags.qpipe.sweep_axes") or ""
            what = f"latest sweep {latest.get('tags.qpipe.sweep')} of experiment {args.experiment}"
            what += f" ({axes})" if axes else ""
        else:
            what += " (it has no sweep yet)"
    runs = load_runs(args.experiment, args.tracking_uri, args.sweep, parent)
    title = f"{what}: {len(runs)} runs"
    models = sorted({str(r.get("params.model")) for r in runs})
    if len(models) == 1:
        title += f", model {models[0]}"
    shown, hidden = table(runs, f"qpipe · {title}", console.width)
    if runs:
        console.print(shown)
    else:
        console.print(f"qpipe · {title}", highlight=False)
    if hidden:
        where = "--out (CSV/HTML)" if not args.out else str(args.out.with_suffix(".csv"))
        console.print(f"not shown at this width: {', '.join(hidden)} — all in {where}", style="dim")
    console.print(verdict(runs), highlight=False)
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
