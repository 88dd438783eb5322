"""Re-price measured memory rows with the current estimator, on any machine.

    python bench/reprice_memory.py ROWS.json --hardware h200_141gb [--tuned gptq] --out OUT.md

A measured peak does not depend on the estimator, only on the code that ran; the estimate is a
pure function of the config. So after an estimator change, rows measured on a GPU before it
can be priced again here, against the same measured numbers (the rows' own command, device and
versions stay in the file). ``--tuned``: quants whose run found the 4-bit kernel's shapes
already tuned by an earlier job of the same process (no cold copies in its window).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import e2e_decode  # noqa: E402

from qpipe.backends import get_backend, weight_format_of  # noqa: E402
from qpipe.config.compose import resolve_dtype  # noqa: E402
from qpipe.stages import memory_budget  # noqa: E402
from qpipe.stages._budget_pricing import kernel_facts  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

MODELS = {"smollm2-135m": "model=smollm2", "internvl3.5-8b": "+model=internvl"}


def reprice(row: dict, hardware: str, tuned: bool) -> dict:
    """The row's run re-estimated as on its GPU: its model, quant and workload."""
    batch, context = (int(x) for x in row["workload"].split(" x "))
    overrides = [
        MODELS[row["model"]],
        f"+quant={row['quant']}",
        f"hardware={hardware}",
        f"workload.batch_size={batch}",
        f"workload.context_len={context}",
    ]
    if row["model"].startswith("internvl"):
        overrides.append("model.weights=random")
    cfg = compose_config(*overrides)
    from omegaconf import OmegaConf

    from qpipe.memory import arch_dims, build_inventory, estimate
    from qpipe.memory.exclusion import plan_precision
    from qpipe.models import load_config

    config = load_config(cfg.model)
    inventory = build_inventory(config, cfg.model.get("model_class", "AutoModelForCausalLM"))
    dtype_bytes = resolve_dtype(cfg, "cuda").itemsize
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    exclude = OmegaConf.to_container(cfg.exclude, resolve=True)
    plan = plan_precision(inventory, exclude, quant["method"] != "none", None, dtype_bytes)
    kernel = get_backend(quant["method"]).resolve_kernel(str(cfg.kernel), quant, "cuda")
    fmt = weight_format_of(quant, dtype_bytes, "cuda", kernel)
    facts = kernel_facts(cfg, quant, plan, inventory, fmt, "cuda", kernel)
    if tuned:
        facts = type(facts)(facts.fused_projections, 0)
    est = estimate(
        inventory,
        plan,
        fmt,
        arch_dims(config),
        memory_budget._workload(cfg),
        dtype_bytes,
        0.0,
        memory_budget._image_cost(cfg, config),
        facts,
    )
    measured = row["mem.measured_peak_gb"]
    return {
        **row,
        "est_peak_before_gb": row["mem.est_peak_gb"],
        "error_before_pct": row["mem.est_error_pct"],
        "mem.est_peak_gb": est.peak_gb,
        "mem.est_kernel_tuning_gb": est.kernel_tuning_gb,
        "mem.est_error_pct": (est.peak_gb - measured) / measured * 100,
        "tuned_earlier_in_process": tuned,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", help="a memory_*.json of bench/decode_check.py")
    p.add_argument("--hardware", default="h200_141gb")
    p.add_argument("--tuned", default="", help="comma-separated quants (see above)")
    p.add_argument("--out", required=True, help="the .md to write (a .json beside it)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    result = json.loads(Path(args.rows).read_text())
    tuned = set(filter(None, args.tuned.split(",")))
    rows = [reprice(r, args.hardware, r["quant"] in tuned) for r in result["rows"]]
    out = Path(args.out)
    repriced = {**result, "repriced_by": "python " + " ".join(sys.argv), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(repriced, indent=1))
    lines = [
        *e2e_decode.markdown_heading(
            "Memory estimate vs measured peak",
            result,
            f"measured by `{result['command']}`; re-priced by `{repriced['repriced_by']}`",
        ),
        "Peak: the torch allocator's, from the start of loading to the end of the budgeted "
        "workload (GB = 1e9 bytes). *before*: the estimator the run itself used.",
        "",
        "| model | quant | workload | measured peak | est before | error before | est now "
        "| of it kernel tuning | error now |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['quant']} | {r['workload']} | {r['mem.measured_peak_gb']:.4f} "
            f"| {r['est_peak_before_gb']:.4f} | {r['error_before_pct']:+.1f} % "
            f"| {r['mem.est_peak_gb']:.4f} | {r['mem.est_kernel_tuning_gb']:.4f} "
            f"| {r['mem.est_error_pct']:+.1f} % |"
        )
    inside = sum(abs(r["mem.est_error_pct"]) <= 5 for r in rows)
    lines += ["", f"{inside} of {len(rows)} rows within ±5 %."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
