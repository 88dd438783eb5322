"""The memory table: the estimate against what was measured, one ``python -m qpipe`` process
per row, ``pipeline=fit`` (quantize, load, validate_vram: the stages that measure memory; the
benchmark stage measures speed and adds nothing to these figures).

    python bench/memory_table.py run OUT --rows internvl:none internvl:awq smollm2:rtn ...
                                [--smollm2 real|TOKENIZER] [--internvl-tokenizer qwen|FOLDER]
                                [--set key=value ...] [--row-timeout S] [--budget S]
    python bench/memory_table.py report OUT [OUT ...] [--before rows.json] [--stem NAME]

Rows are ``model:quant``: ``internvl`` is InternVL3.5-8B with random weights (its default
workload: 2048 tokens with the built-in picture); ``smollm2`` is SmolLM2-135M, its real
weights from the GGUF (``--smollm2 real``, on a machine that has the package) or its
architecture with random weights and a tokenizer folder (``--smollm2 FOLDER``, on the GPU:
``python bench/save_tokenizer.py .gpu/smollm2_tokenizer smollm2``); the memory is the same.

On a GPU each row gives the allocator's peak against the estimate's peak
(``mem.est_error_pct``) and NVML's peak for the process (what nvidia-smi shows) against the
estimate's total (``mem.est_total_error_pct``), with where the bytes beyond the allocator's
peak went (its reserve, the CUDA context, memory held before load). On CPU: the model's
tensors plus the run's allocator peak against the estimate, and the resident set's growth.
``run`` appends each row to ``OUT/rows.json`` as it ends (and the end of its log to
``OUT/logs_tail.txt``: a device call returns 8 files) and writes the table into ``OUT``
(``memory_<card>.json/.md``, bench/harness.py's header); ``report`` merges several OUTs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import qpipe_rows  # noqa: E402

METRICS = (
    "mem.est_weights_gb",
    "mem.loaded_weights_gb",
    "mem.est_peak_gb",
    "mem.measured_peak_gb",
    "mem.est_error_pct",
    "mem.est_reserve_gb",
    "mem.est_runtime_gb",
    "mem.est_total_gb",
    "mem.nvml_process_gb",
    "mem.est_total_error_pct",
    "mem.reserved_peak_gb",
    "mem.reserve_at_peak_gb",
    "mem.context_gb",
    "mem.held_before_load_gb",
    "mem.load_peak_gb",
    "mem.run_peak_gb",
    "mem.host_peak_rss_growth_gb",
    "mem.est_host_rss_error_pct",
    "mem.est_kernel_tuning_gb",
    "time.quantize_s",
    "time.load_s",
    "time.validate_vram_s",
    "time.workload_s",
)


def row_args(spec: str, opts: argparse.Namespace, workdir: Path) -> tuple[str, str, list[str]]:
    model, _, quant = spec.partition(":")
    if model == "internvl":
        args = ["+model=internvl", "model.weights=random", f"model.tokenizer={opts.internvl_tok}"]
    elif model == "smollm2" and opts.smollm2 == "real":
        args = ["+model=smollm2"]
    elif model == "smollm2":
        args = [f"+model={qpipe_rows.write_smollm2_random(workdir, opts.smollm2)}"]
    else:
        raise SystemExit(f"row {spec!r}: the model is internvl or smollm2")
    args += [f"+quant={quant}", "pipeline=fit", f"mlflow.experiment={opts.experiment}"]
    return model, quant, args + list(opts.set)


def run(opts: argparse.Namespace) -> None:
    out: Path = opts.out
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="qpipe-memory-"))
    for spec in opts.rows:
        model, quant, args = row_args(spec, opts, workdir)
        left = opts.budget - (time.perf_counter() - started)
        if left < 30:
            rows.append({"model": model, "quant": quant, "status": "SKIPPED", "error": "budget"})
            continue
        print(f"[memory] {spec}: python -m qpipe {' '.join(args)}", flush=True)
        log = workdir / "logs" / f"{model}_{quant}.log"
        row = qpipe_rows.run_qpipe(args, log, min(opts.row_timeout, left), workdir)
        row.update(model=model, quant=quant)
        rows.append(row)
        qpipe_rows.dump(rows_path, rows)
        qpipe_rows.append_tail(out / "logs_tail.txt", spec, log)
        m = row.get("metrics", {})
        print(
            f"[memory] {spec}: {row['status']} in {row['wall_s']} s; est err "
            f"{m.get('mem.est_error_pct', float('nan')):+.1f} %, total err "
            f"{m.get('mem.est_total_error_pct', float('nan')):+.1f} %",
            flush=True,
        )
        if not opts.keep_checkpoints:
            # 64 GB of disk on the lent GPU: the random InternVL folder stays, checkpoints go
            shutil.rmtree(qpipe_rows.outputs() / "cache" / "stages" / "quantize", True)
    write(rows, out, opts.stem, " ".join(sys.argv))


def _f(value: Any, digits: int = 2, sign: bool = False) -> str:
    if not isinstance(value, int | float) or value != value:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    gpu = any(r.get("metrics", {}).get("mem.nvml_process_gb") is not None for r in rows)
    lines = harness.markdown_heading("Memory: estimate against measured", result)
    lines += [
        "One `python -m qpipe +model=M +quant=Q pipeline=fit` process per row (quantize, load,"
        " validate_vram: the stages that measure memory; the benchmark stage measures speed and"
        " adds nothing here). Workload: the config's default (batch 1, 2048 tokens; InternVL"
        " with the built-in picture in it), prompt + 4 greedy steps. GB = 1e9 bytes.",
        "",
    ]
    if gpu:
        lines += [
            "Peak: the torch allocator's, from the start of loading to the end of the workload"
            " (`mem.est_error_pct`). Total: NVML's peak for the process, what nvidia-smi shows"
            " (`mem.est_total_error_pct`), against the estimate's total = peak + the caching"
            " allocator's reserve + the runtime (CUDA context with the libraries' modules and"
            " workspaces, measured at env_check). Beside it, where the bytes beyond the"
            " allocator's peak went: its reserve at the peak, the context at the end, and what"
            " was allocated before loading (workspaces; an earlier stage's leftovers).",
            "",
            "| model | quant | status | est peak | measured peak | peak err | est total"
            " (reserve + runtime) | NVML total | total err | reserve at peak | context | held"
            " before load | row s |",
            "|" + "---|" * 13,
        ]
        for r in rows:
            m = r.get("metrics", {})
            lines.append(
                "| "
                + " | ".join(
                    [
                        r.get("model", "?"),
                        r.get("quant", "?"),
                        r.get("status", "?"),
                        _f(m.get("mem.est_peak_gb")),
                        _f(m.get("mem.measured_peak_gb")),
                        _f(m.get("mem.est_error_pct"), 1, True) + " %",
                        f"{_f(m.get('mem.est_total_gb'))} ({_f(m.get('mem.est_reserve_gb'))}"
                        f" + {_f(m.get('mem.est_runtime_gb'))})",
                        _f(m.get("mem.nvml_process_gb")),
                        _f(m.get("mem.est_total_error_pct"), 1, True) + " %",
                        _f(m.get("mem.reserve_at_peak_gb")),
                        _f(m.get("mem.context_gb")),
                        _f(m.get("mem.held_before_load_gb")),
                        _f(r.get("wall_s"), 0),
                    ]
                )
                + " |"
            )
        ok = [r for r in rows if r.get("status") == "FINISHED"]
        within = [r for r in ok if abs(r["metrics"].get("mem.est_total_error_pct", 99)) <= 5]
        lines += ["", f"{len(within)} of {len(ok)} finished rows: total within ±5 % of NVML."]
    else:
        before = result.get("before") or {}
        lines += [
            "Measured (CPU): the model's tensors plus the most the run held at once in PyTorch's"
            " CPU allocator, the running phase (prompt + 4 steps), exactly what the estimate"
            " prices; beside it the resident set's growth from before loading to the running"
            " peak, what the OS shows (freed memory returned to the OS at once)."
            + (
                " *Before*: the same rows measured by the previous qpipe (RSS growth over"
                " `generate` of 32 new tokens), from `--before`."
                if before
                else ""
            ),
            "",
            "| model | quant | status | est peak | measured (tensors) | err | RSS growth | err vs"
            " RSS | before: measured | before: err | row s |",
            "|" + "---|" * 11,
        ]
        for r in rows:
            m = r.get("metrics", {})
            b = before.get(f"{r.get('model')}:{r.get('quant')}", {})
            lines.append(
                "| "
                + " | ".join(
                    [
                        r.get("model", "?"),
                        r.get("quant", "?"),
                        r.get("status", "?"),
                        _f(m.get("mem.est_peak_gb"), 3),
                        _f(m.get("mem.measured_peak_gb"), 3),
                        _f(m.get("mem.est_error_pct"), 1, True) + " %",
                        _f(m.get("mem.host_peak_rss_growth_gb"), 3),
                        _f(m.get("mem.est_host_rss_error_pct"), 1, True) + " %",
                        _f(b.get("measured_gb"), 3),
                        _f(b.get("error_pct"), 1, True) + " %",
                        _f(r.get("wall_s"), 0),
                    ]
                )
                + " |"
            )
    if result.get("note"):
        lines += ["", result["note"]]
    failed = [r for r in rows if r.get("status") != "FINISHED"]
    if failed:
        lines += ["", "Not finished:", ""]
        for r in failed:
            error = " ".join(str(r.get("error") or "").split())[:300]
            lines.append(f"- {r.get('model')}:{r.get('quant')}: {r.get('status')}: {error}")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], folder: Path, stem: str | None, command: str,
          before: dict[str, Any] | None = None, note: str = "") -> tuple[Path, Path]:  # fmt: skip
    slim = [
        {
            **{k: r.get(k) for k in ("model", "quant", "status", "wall_s", "command", "error")},
            **{k: r.get(k) for k in ("failed_stage", "run_id", "run_dir")},
            "metrics": {k: r.get("metrics", {}).get(k) for k in METRICS},
            "all_metrics": r.get("metrics", {}),
        }
        for r in rows
    ]
    result = harness.result_header(command, rows=slim, before=before or {}, note=note)
    stem = stem or f"memory_{harness.card_slug(result['device'])}"
    return harness.write_result(stem, result, markdown(result), folder)


def report(opts: argparse.Namespace) -> None:
    rows: dict[str, dict[str, Any]] = {}
    for folder in opts.outs:
        for row in json.loads((folder / "rows.json").read_text()):
            rows[f"{row.get('model')}:{row.get('quant')}"] = row  # a later folder's row wins
    before = json.loads(opts.before.read_text()) if opts.before else None
    command = "python " + " ".join(sys.argv)
    js, md = write(list(rows.values()), opts.out, opts.stem, command, before, opts.note)
    print(f"wrote {js} and {md}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--rows", nargs="+", required=True, help="model:quant, e.g. internvl:awq")
    r.add_argument("--smollm2", default="real", help="real | a tokenizer folder (random weights)")
    r.add_argument("--internvl-tokenizer", dest="internvl_tok", default="qwen")
    r.add_argument("--experiment", default="memory")
    r.add_argument("--set", nargs="*", default=[], help="more overrides for every row")
    r.add_argument("--row-timeout", type=float, default=420)
    r.add_argument("--budget", type=float, default=520, help="seconds for all rows")
    r.add_argument("--stem", default=None)
    r.add_argument("--keep-checkpoints", action="store_true", help="else removed after each row")
    p = sub.add_parser("report")
    p.add_argument("outs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument(
        "--before", type=Path, default=None, help="{model:quant: {measured_gb, error_pct}}"
    )
    p.add_argument("--stem", default=None)
    p.add_argument("--note", default="", help="a paragraph for the table's page")
    opts = parser.parse_args(argv)
    (run if opts.cmd == "run" else report)(opts)


if __name__ == "__main__":
    main()
