"""Quality of every quantizer on SmolLM2 (CPU), on two eval domains, before and after the
mixed-domain calibration set: writes ``quality_smollm2.json`` and ``.md`` into ``--out``.

    python bench/quality_smollm2.py --run --out bench/results          # sweep, then tables
    python bench/quality_smollm2.py --out bench/results                # tables from the store

The sweep is two ``python -m qpipe --multirun`` calls into one outputs folder (``--outputs``):
every quant option with the default (mixed) calibration, then GPTQ and AWQ again with
``calib=licenses`` (the previous default). Decode timing is cut to one repeat and a 512-token
workload: these runs are for quality; the perplexity, KL, top-1 and BLEU settings are the
defaults. ``--default-time-log`` adds the wall and CPU time of a plain ``python -m qpipe`` run
measured with ``/usr/bin/time -v``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

QUANTS = ("none", "bnb_int8", "fp8", "gptq", "awq", "rtn", "bnb_nf4")
SPEED_CUTS = ("workload.context_len=64", "eval.repeats=1", "eval.prefill_tokens=128")
AFTER, BEFORE = "quality_after", "quality_before"


def sweep_commands(outputs: Path, tokens: int, only: list[str] | None = None) -> list[list[str]]:
    """Most telling first (GPTQ after/before), AWQ (the slowest) last, so that a sweep cut
    short still answers the main question. ``only``: these options (and the fp32 baseline)
    with the default calibration, nothing else."""
    qpipe = [sys.executable, "-m", "qpipe", "--multirun"]
    cuts = [*SPEED_CUTS, f"eval.max_tokens={tokens}"]
    after = [*cuts, f"mlflow.experiment={AFTER}"]
    if only:
        return [[*qpipe, f"quant={','.join(dict.fromkeys(['none', *only]))}", *after]]
    before = ["calib=licenses", *cuts, f"mlflow.experiment={BEFORE}",
              f"mlflow.tracking_uri=sqlite:///{outputs}/mlflow_before.db"]  # fmt: skip
    return [
        [*qpipe, "quant=gptq", *after],
        [*qpipe, "quant=gptq", *before],
        [*qpipe, "quant=bnb_nf4,rtn,bnb_int8,fp8,awq,none", *after],
        [*qpipe, "quant=awq", *before],
    ]


def _runs(experiment: str, uri: str) -> list[dict[str, Any]]:
    from qpipe.report import load_runs

    try:
        runs = load_runs(experiment, uri)
    except Exception as err:  # no such experiment (yet): nothing measured
        print(f"{experiment} in {uri}: {err}")
        return []
    return [r for r in runs if r.get("status") == "FINISHED"]


def _latest_by_quant(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["params.quant"]: r for r in runs}  # oldest first: the last run of each wins


def _m(run: dict[str, Any], name: str) -> float | None:
    return run.get(f"metrics.{name}")


def _f(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _rank(values: dict[str, float], reverse: bool = False) -> list[str]:
    return sorted(values, key=values.get, reverse=reverse)


def _time_log(path: Path) -> dict[str, float]:
    text = path.read_text()

    def grab(pattern: str) -> float:
        return float(re.search(pattern, text).group(1))

    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    return {
        "wall_s": h * 3600 + m * 60 + s,
        "user_s": grab(r"User time \(seconds\): ([\d.]+)"),
        "sys_s": grab(r"System time \(seconds\): ([\d.]+)"),
    }


def tables(after: dict[str, dict], before: dict[str, dict], domains: list[str]) -> list[str]:
    first, off = domains[0], domains[1]
    lines = [
        f"| quant | calibration | ppl {first} | Δ% {first} | ppl {off} | Δ% {off} | KL "
        "(nats/token) | top-1 agree | BLEU vs fp32 | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if after and "none" not in after:  # every run logs the cached baseline's perplexity
        r = next(iter(after.values()))
        lines.append(
            f"| fp32 (baseline) | — | {_f(_m(r, f'quality.baseline_ppl.{first}'))} | — "
            f"| {_f(_m(r, f'quality.baseline_ppl.{off}'))} | — | 0 | 1 | 100 | — |"
        )
    rows = [(q, "mixed" if q in ("gptq", "awq") else "—", after[q]) for q in QUANTS if q in after]
    rows += [(q, "licenses (before)", before[q]) for q in ("gptq", "awq") if q in before]
    for quant, calib, r in rows:
        lines.append(
            f"| {'none (fp32)' if quant == 'none' else quant} | {calib} "
            f"| {_f(_m(r, f'quality.ppl.{first}'))} "
            f"| {_f(_m(r, f'quality.ppl_delta_pct.{first}'), 1, True)} "
            f"| {_f(_m(r, f'quality.ppl.{off}'))} "
            f"| {_f(_m(r, f'quality.ppl_delta_pct.{off}'), 1, True)} "
            f"| {_f(_m(r, 'quality.kld'), 4)} | {_f(_m(r, 'quality.top1_agree'), 3)} "
            f"| {_f(_m(r, 'quality.bleu_vs_baseline'), 1)} "
            f"| {_f(_m(r, 'time.quantize_s'), 1) if quant != 'none' else '—'} |"
        )
    return lines


def checks(after: dict[str, dict], before: dict[str, dict], domains: list[str]) -> list[str]:
    """The issue's targets, each judged from the numbers above ("not measured" where a run it
    needs is missing)."""
    out = []
    quants = [q for q in QUANTS if q != "none" and q in after]
    for d in domains:
        ppl = {q: _m(after[q], f"quality.ppl.{d}") for q in quants}
        good = [q for q in ("gptq", "awq") if q in ppl]
        bad = [q for q in ("bnb_nf4", "rtn") if q in ppl]
        if not good or not bad:
            out.append(f"- GPTQ/AWQ ahead of nf4/RTN on {d}: not measured")
            continue
        worst_good, best_bad = max(ppl[q] for q in good), min(ppl[q] for q in bad)
        out.append(
            f"- {'/'.join(good)} ahead of {'/'.join(bad)} on {d}: "
            f"{'met' if worst_good < best_bad else 'NOT met'} (worst of {'/'.join(good)} "
            f"{worst_good:.2f}, best of {'/'.join(bad)} {best_bad:.2f})"
        )
    if "fp8" in after:  # issue 31: near-lossless at half the bytes
        deltas = {d: _m(after["fp8"], f"quality.ppl_delta_pct.{d}") for d in domains}
        ok = all(v is not None and v <= 3.0 for v in deltas.values())
        shown = ", ".join(f"{d} {_f(v, 2, True)} %" for d, v in deltas.items())
        out.append(
            f"- fp8 within +3 % of fp32 on every domain: {'met' if ok else 'NOT met'} ({shown})"
        )
    else:
        out.append("- fp8 within +3 % of fp32: not measured")
    off = domains[1]
    for q in ("gptq", "awq"):
        if q in after and q in before:
            b = _m(before[q], f"quality.ppl_delta_pct.{off}")
            a = _m(after[q], f"quality.ppl_delta_pct.{off}")
            verdict = "met" if a < b else "NOT met"
            out.append(f"- {q} off-domain ({off}) Δ shrinks: {verdict} ({b:+.1f} % → {a:+.1f} %)")
        else:
            out.append(f"- {q} off-domain Δ before/after: not measured")
    if len(quants) < 2:
        return [*out, "- rankings by KL / top-1: not measured"]
    mean_ppl = {
        q: sum(_m(after[q], f"quality.ppl_delta_pct.{d}") for d in domains) / len(domains)
        for q in quants
    }
    kld = {q: _m(after[q], "quality.kld") for q in quants}
    top1 = {q: _m(after[q], "quality.top1_agree") for q in quants}
    by_ppl, by_kl, by_top1 = _rank(mean_ppl), _rank(kld), _rank(top1, reverse=True)
    out.append(
        f"- KL ranks as perplexity (mean Δ% over both domains) does: "
        f"{'met' if by_kl == by_ppl else 'NOT met'} (ppl: {' < '.join(by_ppl)}; "
        f"KL: {' < '.join(by_kl)})"
    )
    out.append(
        f"- top-1 agreement ranks as perplexity does: "
        f"{'met' if by_top1 == by_ppl else 'NOT met'} (top-1, best first: {' > '.join(by_top1)})"
    )
    if "bnb_int8" in kld:
        out.append(
            f"- int8 has the lowest KL: {'met' if by_kl[0] == 'bnb_int8' else 'NOT met'} "
            f"({by_kl[0]}, {kld[by_kl[0]]:.4f})"
        )
    else:
        out.append("- int8 has the lowest KL: not measured")
    measured = set(quants) | {"none"} & set(after)
    missing = [q for q in QUANTS if q not in measured]
    if missing or set(before) != {"gptq", "awq"}:
        out.append(
            f"- not measured in this sweep: {', '.join(missing) or '—'} (mixed calibration); "
            f"{', '.join(q for q in ('gptq', 'awq') if q not in before) or '—'} (licenses)"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--outputs", type=Path, default=Path("/tmp/qpipe-quality-sweep"))
    parser.add_argument("--run", action="store_true", help="run the sweep first")
    parser.add_argument("--tokens", type=int, default=4096, help="eval tokens per domain")
    parser.add_argument("--default-time-log", type=Path, default=None)
    parser.add_argument("--note", default="", help="conditions of this sweep, for the report")
    parser.add_argument("--only", default="", help="options to run (with none), e.g. fp8")
    parser.add_argument("--stem", default="quality_smollm2", help="result files' name")
    args = parser.parse_args(argv)
    outputs = args.outputs.resolve()
    env = {**os.environ, "QPIPE_OUTPUTS": str(outputs), "MPLBACKEND": "Agg"}
    only = [q for q in args.only.split(",") if q]
    commands = sweep_commands(outputs, args.tokens, only)
    if args.run:
        for cmd in commands:
            subprocess.run(["nice", "-n", "10", *cmd], env=env, check=False)
    os.environ["QPIPE_OUTPUTS"] = str(outputs)
    after_runs = _runs(AFTER, f"sqlite:///{outputs}/mlflow.db")
    before_runs = _runs(BEFORE, f"sqlite:///{outputs}/mlflow_before.db")
    after, before = _latest_by_quant(after_runs), _latest_by_quant(before_runs)
    domains = ["gpl3", "pydocs"]
    baseline = next((outputs / "cache" / "stages" / "baseline").glob("*/result.json"), None)
    price = {}
    if baseline:
        out = json.loads(baseline.read_text())["outputs"]
        price = {k: out[k] for k in ("reference_mb", "full_logits_mb")}
    record: dict[str, Any] = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "commands": [f"python {' '.join(c[1:])}" for c in commands],
        "eval_tokens_per_domain": args.tokens,
        "note": args.note,
        "baseline_cache": price,
        "targets": checks(after, before, domains),
        "runs": {"after": after_runs, "before": before_runs},
    }
    if args.default_time_log:
        record["default_pipeline"] = {
            "command": "/usr/bin/time -v python -m qpipe",
            **_time_log(args.default_time_log),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(record, indent=2))
    any_run = next(iter(after.values()), {})
    lib = {k[len("params.lib.") :]: v for k, v in any_run.items() if "params.lib." in k}
    md = [
        "# SmolLM2-135M quality on CPU: two eval domains, agreement with fp32, calibration "
        "before/after",
        "",
        f"Device: {record['device']}. Versions: "
        + ", ".join(
            f"{k} {lib[k]}"
            for k in ("torch", "transformers", "llmcompressor", "bitsandbytes")
            if k in lib
        )  # fmt: skip
        + ".",
        "",
        "Commands (one outputs folder, `QPIPE_OUTPUTS`):",
        "",
        *[f"    python {' '.join(c[1:])}" for c in commands],
        "",
        f"(`python bench/quality_smollm2.py --run --tokens {args.tokens} --out DIR` runs them "
        "and writes these tables). Perplexity over the first "
        f"{args.tokens} tokens of each eval text (1024-token windows): `gpl3` = the GPL-3 text "
        "(legal, in-domain for the old license calibration), `pydocs` = Python language "
        "reference sections (off-domain). KL = mean KL(fp32 ‖ quant) of the next-token "
        "distributions over the top 32 fp32 tokens plus one tail bucket (a lower bound of the "
        f"full KL), over all {2 * (args.tokens - -(-args.tokens // 1024))} eval tokens; top-1 = "
        "share of those tokens where both pick the "
        "same next token; BLEU = sacrebleu of 8 prompts' 32-token greedy continuations vs fp32's. "
        "GPTQ/AWQ/RTN: W4 g64 asymmetric; GPTQ/AWQ calibrated on 32 × 256 tokens.",
        "",
        *tables(after, before, domains),
        "",
        *([args.note, ""] if args.note else []),
        "Targets:",
        "",
        *record["targets"],
        "",
    ]
    if price:
        md += [
            f"The baseline caches the top-32 log-probs and ids of every eval token: "
            f"{price['reference_mb']:.1f} MB, where full fp32 logits would take "
            f"{price['full_logits_mb']:.0f} MB.",
            "",
        ]
    if "default_pipeline" in record:
        d = record["default_pipeline"]
        md += [
            f"Default pipeline (`python -m qpipe`, quant=none, both domains, KL/top-1/BLEU): "
            f"{d['wall_s']:.0f} s wall, {d['user_s'] + d['sys_s']:.0f} s CPU.",
            "",
        ]
    (args.out / f"{args.stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
