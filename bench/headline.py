"""The headline's wall time: ``python -m qpipe +model=internvl model.weights=random +quant=awq``
run as a user runs it, then another quantizer (``rtn``) on the same outputs folder, which
finds the first run's compiled decode step, Triton kernels and kernel tuning in
``outputs/cache``. Per run: the wall time, each stage's time, what happened outside the
stages (interpreter start, imports, MLflow), the compile and tuning seconds and what the
cache saved (``time.cache_saved_s``: the first run's measured warm-up minus this one's).

    python bench/headline.py run OUT [--quants awq rtn] [--model internvl]
                                     [--tokenizer qwen|FOLDER] [--set key=value ...]
    python bench/headline.py report OUT --out bench/results

``run`` starts from an empty outputs folder of its own (``--outputs``, default a fresh one
under /tmp), so the first run is cold; it writes ``headline_<card>.json/.md`` (bench/harness.py's
header) and ``logs_tail.txt`` into OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import qpipe_rows  # noqa: E402

KEEP = (
    "time.quantize_compute_s",
    "quantize.quant.oneshot_s",
    "time.workload_s",
    "time.kernel_tuning_validate_s",
    "time.kernel_tuning_s",
    "time.compile_s",
    "time.warmup_s",
    "time.cold_warmup_s",
    "time.cache_saved_s",
    "cache.compiled_graphs_reused",
    "cache.compiled_graphs_made",
    "cache.tuned_shapes_reused",
    "cache.tuned_shapes_made",
    "perf.ttft_ms",
    "perf.decode_tok_s",
    "perf.decode_tok_s_eager",
    "perf.decode_tok_s_image",
    "mem.est_peak_gb",
    "mem.measured_peak_gb",
    "mem.est_error_pct",
    "mem.est_total_gb",
    "mem.nvml_process_gb",
    "mem.est_total_error_pct",
)
TARGET_S = 180.0  # issue 33: the headline in three minutes


def model_args(opts: argparse.Namespace) -> list[str]:
    if opts.model == "smollm2":
        return []  # the default model: `python -m qpipe` as the README runs it
    args = [f"+model={opts.model}"]
    if opts.model == "internvl":
        args += ["model.weights=random", f"model.tokenizer={opts.tokenizer}"]
    return args


def run(opts: argparse.Namespace) -> None:
    out: Path = opts.out
    out.mkdir(parents=True, exist_ok=True)
    outputs = opts.outputs or Path(f"/tmp/qpipe-headline-{os.getpid()}")
    shutil.rmtree(outputs, ignore_errors=True)  # cold: nothing compiled, tuned or cached
    os.environ["QPIPE_OUTPUTS"] = str(outputs)
    logs = outputs.parent / f"{outputs.name}-logs"
    runs = []
    started = time.perf_counter()
    for i, quant in enumerate(opts.quants):
        # exactly the user's command (its MLflow run is found by the id the summary prints)
        args = [*model_args(opts), *([] if quant == "none" else [f"+quant={quant}"]), *opts.set]
        left = opts.budget - (time.perf_counter() - started)
        if left < 30:
            runs.append({"quant": quant, "status": "SKIPPED", "error": "out of budget"})
            continue
        print(f"[headline] run {i + 1}: python -m qpipe {' '.join(args)}", flush=True)
        log = logs / f"{i + 1}_{quant}.log"
        row = qpipe_rows.run_qpipe(args, log, min(opts.run_timeout, left))
        row.update(quant=quant, order=i + 1)
        stages = qpipe_rows.stage_times(row.get("metrics", {}))
        row["stages_s"] = stages
        row["outside_stages_s"] = round(row["wall_s"] - sum(stages.values()), 1)
        runs.append(row)
        qpipe_rows.append_tail(out / "logs_tail.txt", f"run {i + 1}: {quant}", log)
        print(f"[headline] run {i + 1} ({quant}): {row['status']} in {row['wall_s']} s", flush=True)
    command = "python bench/headline.py " + " ".join(sys.argv[1:])
    write(runs, out, command, " ".join(model_args(opts)), opts.stem)


def _f(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "—"


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = harness.markdown_heading("The headline's wall time", result)
    lines += [
        f"`python -m qpipe {result['model_args']} +quant=Q` (the default pipeline: env_check →"
        " memory_budget → … → quantize → load → validate_vram → benchmark), one process per"
        " run, one outputs folder for all of them, empty before the first: run 1 compiles and"
        " tunes from nothing; the next runs find its compiled decode step, Triton kernels and"
        " kernel tuning in outputs/cache. Seconds of wall time; *outside stages*: interpreter"
        " start, imports, MLflow. Target: ≤ 180 s.",
        "",
        "| run | quant | status | wall s | outside stages | "
        + " | ".join(_STAGES)
        + " | compile s | tuning s | cache saved s |",
        "|" + "---|" * (8 + len(_STAGES)),
    ]
    for r in runs:
        m, st = r.get("metrics", {}), r.get("stages_s", {})
        cells = [
            str(r.get("order", "?")),
            r.get("quant", "?"),
            r.get("status", "?"),
            _f(r.get("wall_s")),
            _f(r.get("outside_stages_s")),
            *[_f(st.get(s)) for s in _STAGES],
            _f(m.get("time.compile_s")),
            _f(m.get("time.kernel_tuning_s")),
            _f(m.get("time.cache_saved_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per run, what the caches did and the memory figures:", ""]
    for r in runs:
        m = r.get("metrics", {})
        lines.append(
            f"- run {r.get('order')} ({r.get('quant')}): compiled graphs reused"
            f" {_f(m.get('cache.compiled_graphs_reused'), 0)} / made"
            f" {_f(m.get('cache.compiled_graphs_made'), 0)}; tuned shapes reused"
            f" {_f(m.get('cache.tuned_shapes_reused'), 0)} / made"
            f" {_f(m.get('cache.tuned_shapes_made'), 0)}; warm-up {_f(m.get('time.warmup_s'))} s"
            f" (first run's {_f(m.get('time.cold_warmup_s'))} s); quantize compute"
            f" {_f(m.get('time.quantize_compute_s'))} s (oneshot {_f(m.get('quantize.quant.oneshot_s'))}"
            f" s); validate workload {_f(m.get('time.workload_s'))} s; decode"
            f" {_f(m.get('perf.decode_tok_s'))} tok/s; peak err {_f(m.get('mem.est_error_pct'))} %,"
            f" total err {_f(m.get('mem.est_total_error_pct'))} % (NVML"
            f" {_f(m.get('mem.nvml_process_gb'), 2)} GB)"
        )
    for r in runs:
        if r.get("status") != "FINISHED":
            error = " ".join(str(r.get("error") or "").split())[:300]
            lines.append(f"- run {r.get('order')} ({r.get('quant')}) {r.get('status')}: {error}")
    met = [r for r in runs if r.get("status") == "FINISHED" and r["wall_s"] <= TARGET_S]
    lines += ["", f"{len(met)} of {len(runs)} runs within {TARGET_S:.0f} s."]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


_STAGES = (
    "env_check",
    "memory_budget",
    "baseline",
    "quantize",
    "load",
    "validate_vram",
    "benchmark",
)


def write(
    runs: list[dict[str, Any]], folder: Path, command: str, model: str, stem: str | None = None
) -> None:
    slim = [
        {
            **{k: r.get(k) for k in ("order", "quant", "status", "wall_s", "command", "error")},
            **{k: r.get(k) for k in ("stages_s", "outside_stages_s", "run_id", "failed_stage")},
            "metrics": {k: r.get("metrics", {}).get(k) for k in KEEP},
            "all_metrics": r.get("metrics", {}),
        }
        for r in runs
    ]
    result = harness.result_header(command, runs=slim, model_args=model, target_s=TARGET_S)
    stem = stem or f"headline_{harness.card_slug(result['device'])}"
    js, md = harness.write_result(stem, result, markdown(result), folder)
    print(f"wrote {js} and {md}", flush=True)


def report(opts: argparse.Namespace) -> None:
    """Rewrite the table from a run's JSON (after a fix to the table only)."""
    source = opts.src if opts.src.is_file() else next(opts.src.glob("headline_*.json"))
    result = json.loads(source.read_text())
    if opts.note:
        result["note"] = opts.note
    harness.write_result(source.stem, result, markdown(result), opts.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--quants", nargs="+", default=["awq", "rtn"])
    r.add_argument("--model", default="internvl")
    r.add_argument("--tokenizer", default="qwen", help="qwen | a tokenizer folder")
    r.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    r.add_argument("--outputs", type=Path, default=None, help="emptied first")
    r.add_argument("--run-timeout", type=float, default=400)
    r.add_argument("--budget", type=float, default=510, help="seconds for all runs")
    r.add_argument("--stem", default=None, help="default headline_<card>")
    p = sub.add_parser("report")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--note", default="", help="a paragraph for the table's page")
    opts = parser.parse_args(argv)
    (run if opts.cmd == "run" else report)(opts)


if __name__ == "__main__":
    main()
