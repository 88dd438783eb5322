"""savings: stop before quantizing when the chosen quantization would not save enough memory
over the unquantized model (both priced by memory_budget from the config alone).

A user stage: ``run(ctx) -> StageResult`` like the built-in ones; it reads the config and the
outputs of the stages it needs, returns metrics, and never talks to MLflow (the runner does).
Its setting is a key of its own: ``+savings.min_pct=50`` on the command line.
"""

from __future__ import annotations

from qpipe.stages.base import StageContext, StageResult

DEFAULT_MIN_PCT = 30.0


def run(ctx: StageContext) -> StageResult:
    options = ctx.output("memory_budget", "options")
    chosen = ctx.cfg.quant.name
    setting = ctx.cfg.get("savings") or {}
    min_pct = float(setting.get("min_pct", DEFAULT_MIN_PCT))
    unquantized, quantized = options["none"], options[chosen]
    saving_pct = 100.0 * (1.0 - quantized / unquantized)
    stop = None
    if saving_pct < min_pct:
        stop = (
            f"quant={chosen} saves {saving_pct:.1f} % of the estimated peak "
            f"({unquantized:.3f} → {quantized:.3f} GB), less than savings.min_pct={min_pct:g}: "
            "not worth quantizing"
        )
    return StageResult(
        outputs={"saving_pct": saving_pct, "min_pct": min_pct},
        metrics={"mem.est_saving_pct": saving_pct},
        stop=stop,
    )
