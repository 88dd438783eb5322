"""End-to-end greedy decoding, the way people deploy it: bf16 vs bitsandbytes nf4 vs qpipe W4
(RTN, QuantLinear on the Triton kernels; with and without the lm_head quantized), one harness
(``qpipe.evaluation.decode``: static KV cache, compiled + CUDA-graph step; the same loop eager beside it),
one process, one GPU.

    python bench/e2e_decode.py --out DIR [--variants bf16,nf4,w4,w4_head] [--batches 1,4,16]

Any variant with the suffix ``_fusednorm`` (``bf16_fusednorm``, ``w4_fusednorm``) is the same
model decoding with ``QPIPE_FUSED_NORM=1`` (the residual adds and RMSNorms on qpipe's fused
kernel, ``qpipe.evaluation.fused_norm``); the other variants run with it off, so one call
measures before and after.

The model is Qwen3-8B's architecture (InternVL3.5-8B's language model) with random weights
built from its config (no hub on the lent GPU): memory and speed are real, tokens are not.
Writes DIR/e2e_<tag>.json and .md with the device, versions, the command and raw numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qpipe.backends import weight_format_of  # noqa: E402
from qpipe.config.compose import load_model_group  # noqa: E402
from qpipe.evaluation import decode  # noqa: E402
from qpipe.evaluation.fused_norm import ENV as FUSED_NORM_ENV  # noqa: E402
from qpipe.memory import Workload, arch_dims, estimate, inventory_of  # noqa: E402
from qpipe.memory.exclusion import plan_precision  # noqa: E402
from qpipe.models.source import load_config  # noqa: E402

QUANT = {
    "bf16": {"method": "none", "bits": 16},
    "nf4": {"method": "bnb", "bits": 4, "quant_type": "nf4", "double_quant": True},
    "w4": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
    "w4_head": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
    "w4_unfused": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
    "w8": {"method": "rtn", "bits": 8, "group_size": 128, "symmetric": True},
    "fp8": {"method": "fp8", "bits": 8, "group_size": 0},
    # the same layers with the decode GEMV off: W8A8 (_scaled_mm) at every batch, for the ratio
    "fp8_w8a8": {"method": "fp8", "bits": 8, "group_size": 0},
    # a mixed 4/8-bit plan of the kind quant=auto makes: down_proj at 8 bits, the rest at 4
    "w4_w8down": None,
}


FUSED_NORM = "_fusednorm"  # a variant's suffix: its decode step on the fused add + RMSNorm


def base_variant(variant: str) -> str:
    """The precision a variant builds (``w4_fusednorm`` -> ``w4``)."""
    return variant.removesuffix(FUSED_NORM)


def result_header(harness_name: str, **extra) -> dict:
    """What every bench result file starts with (bench/harness.py: the command, date, card,
    versions), and which harness measured it."""
    import harness

    return harness.result_header(harness=harness_name, **extra)


def markdown_heading(title: str, result: dict, command: str | None = None) -> list[str]:
    """The first lines of every bench result page (bench/harness.py's)."""
    import harness

    lines = harness.markdown_heading(title, result)
    if command:
        lines[2] = command
    return lines


def build_bf16(seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = load_config(load_model_group("qwen3_8b"))
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _block_linears(model, with_head: bool) -> list[str]:
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n and m.weight.dtype.is_floating_point
    ]
    return names + (["lm_head"] if with_head else [])


def _swap(model, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def to_w4(model, with_head: bool, fuse: bool = True) -> None:
    """RTN W4 g128 on QuantLinear (Triton); ``fuse``: q/k/v and gate/up as one matmul each,
    as the load stage does for kernel=triton."""
    from qpipe.kernels import QuantLinear
    from qpipe.kernels.fusion import fuse_projections

    for name in _block_linears(model, with_head):
        lin = model.get_submodule(name)
        q = QuantLinear.from_linear(lin, group_size=128, symmetric=False, kernel="triton")
        _swap(model, name, q)
        del lin
    if with_head:
        model.config.tie_word_embeddings = False
    if fuse:
        fuse_projections(model)


def to_w8(model, only: str = "") -> None:
    """RTN W8 g128 (symmetric) on Int8Linear's Triton kernel, for the block Linears whose name
    contains ``only`` (all of them when empty)."""
    from qpipe.kernels import quantize_rtn
    from qpipe.kernels.int8_linear import Int8Linear

    for name in _block_linears(model, False):
        if only not in name:
            continue
        lin = model.get_submodule(name)
        iw = quantize_rtn(lin.weight.data, group_size=128, bits=8, symmetric=True)
        bias = None if lin.bias is None else lin.bias.data
        _swap(model, name, Int8Linear(iw, bias, torch.bfloat16, kernel="triton"))
        del lin


def to_fp8(model, gemv: bool = True) -> None:
    """e4m3 weights per output channel on Fp8Linear as quant=fp8 loads them: the FP8 GEMV
    (weight-only) for steps of at most 4 rows, torch._scaled_mm with activations quantized per
    token above (on GPUs with FP8 tensor cores; weight-only elsewhere). ``gemv=False``:
    _scaled_mm at every step."""
    from qpipe.kernels.fp8_linear import Fp8Linear, fp8_tensor_cores, quantize_per_channel

    kernel = "scaled_mm" if fp8_tensor_cores() else "torch"
    for name in _block_linears(model, False):
        lin = model.get_submodule(name)
        q, scale = quantize_per_channel(lin.weight.data)
        bias = None if lin.bias is None else lin.bias.data
        _swap(model, name, Fp8Linear(q, scale, bias, torch.bfloat16, kernel, gemv=gemv))
        del lin


def to_nf4(model) -> None:
    import bitsandbytes as bnb

    for name in _block_linears(model, False):
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data.to("cpu"),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=True,
        ).to("cuda")
        _swap(model, name, q)
        del lin


def estimated_peak(variant: str, batch: int, context: int) -> dict[str, float]:
    """qpipe's estimator for this variant and workload (weights + KV cache + activations)."""
    from transformers import AutoModelForCausalLM

    config = load_config(load_model_group("qwen3_8b"))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    inventory = inventory_of(meta)
    quant = QUANT[variant]
    if quant is None:  # a mixed plan: the estimator prices it from a bit plan, not done here
        return {"est_weights_gb": float("nan"), "est_peak_gb": float("nan")}
    exclude = {"lm_head": variant != "w4_head", "embeddings": True, "patterns": []}
    plan = plan_precision(inventory, exclude, quantize=quant["method"] != "none")
    est = estimate(
        inventory,
        plan,
        weight_format_of(quant, 2, "cuda"),
        arch_dims(config),
        Workload(batch_size=batch, context_len=context),
        2,
        0.0,
    )
    return {"est_weights_gb": est.weights_gb, "est_peak_gb": est.peak_gb}


def build_variant(variant: str):
    """Qwen3-8B's architecture, random weights, in ``variant``'s precision on the GPU."""
    model = build_bf16()
    if variant == "nf4":
        to_nf4(model)
    elif variant == "w8":
        to_w8(model)
    elif variant in ("fp8", "fp8_w8a8"):
        to_fp8(model, gemv=variant == "fp8")
    elif variant == "w4_w8down":
        to_w8(model, only="down_proj")
        to_w4(model, with_head=False)
    elif variant.startswith("w4"):
        to_w4(model, with_head=variant == "w4_head", fuse=variant != "w4_unfused")
    gc.collect()
    torch.cuda.empty_cache()
    return model


def teacher_forced(model, prompt: torch.Tensor, tokens: list[int]) -> dict:
    """The compiled loop's greedy tokens against the eager model run once over prompt + those
    tokens: at how many positions is the eager argmax the same token, and where it is not,
    how far (in units of that position's logit spread) the compiled choice is from the
    eager top. Random weights make near-ties common, so a free-running comparison drifts
    apart after the first near-tie; this one checks every position on the same history."""
    want = torch.tensor(tokens, device=prompt.device)
    seq = torch.cat([prompt[0], want[:-1]])[None]
    with torch.inference_mode():
        logits = model(input_ids=seq, logits_to_keep=len(tokens)).logits[0].float()
    top2 = logits.topk(2, dim=-1).values
    spread = logits.std(dim=-1)
    gap = (top2[:, 0] - logits.gather(-1, want[:, None])[:, 0]) / spread
    same = logits.argmax(-1) == want
    return {
        "positions": len(tokens),
        "agree": int(same.sum()),
        "max_gap_where_differ_std": float(gap[~same].max()) if bool((~same).any()) else 0.0,
        "median_top2_margin_std": float(((top2[:, 0] - top2[:, 1]) / spread).median()),
    }


def run_variant(
    variant: str, plan: list[tuple[str, list[int]]], args, rows: list[dict], save
) -> None:
    """One model build, then each (mode, batch sizes) of ``plan`` in turn; each row goes into
    ``rows`` and ``save()`` writes the result files at once (a call cut short keeps them)."""
    model = build_variant(base_variant(variant))
    before = os.environ.get(FUSED_NORM_ENV)
    os.environ[FUSED_NORM_ENV] = "1" if variant.endswith(FUSED_NORM) else "0"
    weights_gb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen)
    for mode, batches in plan:
        for batch in batches:
            new = args.new_tokens if mode == "compiled" else args.eager_new_tokens
            ids = prompt.repeat(batch, 1).cuda()
            torch._dynamo.reset()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                t = decode.measure(
                    model,
                    {"input_ids": ids},
                    new,
                    compiled=mode == "compiled",
                    repeats=args.repeats,
                )
            except Exception as err:  # a row that fails is recorded, the others still run
                rows.append({"variant": variant, "mode": mode, "batch": batch, "error": repr(err)})
                save()
                print(f"{variant:8s} {mode:8s} b{batch:<3d} FAILED {err!r}", flush=True)
                continue
            row = {
                "variant": variant,
                "weights_gb": weights_gb,
                "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                "wall_s": time.perf_counter() - start,
                **t.as_dict(),
                **estimated_peak(base_variant(variant), batch, args.prompt + new + 1),
            }
            row["est_error_pct"] = (
                (row["est_peak_gb"] - row["peak_allocated_gb"]) / row["peak_allocated_gb"] * 100
            )
            if mode == "compiled" and batch == 1:
                row["teacher_forced"] = teacher_forced(model, ids, t.tokens)
            rows.append(row)
            save()
            print(
                f"{variant:8s} {mode:8s} b{batch:<3d} {t.decode_tok_s:8.1f} tok/s  "
                f"ttft {t.ttft_ms:7.1f} ms  compile {t.compile_s:5.1f} s  "
                f"peak {row['peak_allocated_gb']:.2f} GB (est {row['est_peak_gb']:.2f})",
                flush=True,
            )
    from qpipe.kernels.tuning import TUNER

    for line in TUNER.skipped:  # candidate configurations that did not compile or run
        print(f"tuner skipped {line}", flush=True)
    if before is None:
        os.environ.pop(FUSED_NORM_ENV, None)
    else:
        os.environ[FUSED_NORM_ENV] = before
    del model
    gc.collect()
    torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        *markdown_heading("End-to-end greedy decoding", result),
        f"Qwen3-8B architecture, random weights, prompt {result['args']['prompt']} tokens; "
        "compiled = static KV cache + torch.compile(reduce-overhead, fullgraph) decode step; "
        "eager = the same loop uncompiled; every variant attends through qpipe's split-KV "
        "decode kernel (grouped heads, no KV-cache copy). W4 = RTN int4 g128 asymmetric on "
        "QuantLinear (Triton), q/k/v and gate/up fused. FP8 = e4m3 per channel on Fp8Linear: "
        "the FP8 GEMV (weight-only) at batch <= 4, torch._scaled_mm (W8A8) above it and in "
        "the prefill; fp8_w8a8 = _scaled_mm at every step. Medians of repeats after warm-up.",
        "",
        *[f"> {n}" for n in result.get("notes", [])],
        "",
        "| variant | mode | batch | decode tok/s | ms/token | TTFT ms | compile s | weights GB "
        "| peak GB | est peak GB | est error | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['decode_tok_s']:.1f} "
            f"| {r['decode_ms_per_token']:.2f} | {r['ttft_ms']:.1f} | {r['compile_s']:.1f} "
            f"| {r['weights_gb']:.2f} | {r['peak_allocated_gb']:.2f} | {r['est_peak_gb']:.2f} "
            f"| {r['est_error_pct']:+.1f} % | {r.get('source', '')} |"
        )
    lines += ["", *token_agreement(rows), *teacher_forced_lines(rows)]
    return "\n".join(lines) + "\n"


def token_agreement(rows: list[dict]) -> list[str]:
    """Per variant: do the compiled and eager loops give the same greedy tokens (batch 1, as
    far as the shorter eager run goes)?"""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        got = {
            r["mode"]: r["tokens"]
            for r in rows
            if r["variant"] == variant and r.get("batch") == 1 and "tokens" in r
        }
        if {"compiled", "eager"} <= got.keys():
            n = min(len(got["compiled"]), len(got["eager"]))
            same = got["compiled"][:n] == got["eager"][:n]
            out.append(
                f"- {variant}: compiled and eager greedy tokens "
                + (f"agree (first {n})" if same else f"DIFFER within the first {n}")
            )
    return out


def teacher_forced_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        tf = r.get("teacher_forced")
        if tf:
            out.append(
                f"- {r['variant']}: eager argmax = compiled token at {tf['agree']}/"
                f"{tf['positions']} positions (same history); where not, the compiled token's "
                f"logit is {tf['max_gap_where_differ_std']:.3f} std below the eager top at most; "
                f"median top-2 margin {tf['median_top2_margin_std']:.3f} std"
            )
    return out


def merge(paths: list[str], out: Path, tag: str, notes: list[str] | None = None) -> None:
    """One table from several calls of this script (each keeps its own command and device);
    every row names the result file it came from."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for path, part in zip(paths, parts, strict=True):
        for row in part["rows"]:
            row.setdefault("source", Path(path).stem)
    devices = {json.dumps(p["device"], sort_keys=True) for p in parts}
    merged = {
        **parts[0],
        "command": " ; ".join(p["command"] for p in parts),
        "calls": [{k: p[k] for k in ("command", "device", "versions")} for p in parts],
        "same_device_and_versions": len(devices) == 1
        and len({json.dumps(p["versions"], sort_keys=True) for p in parts}) == 1,
        "notes": notes or [],
        "rows": [r for p in parts for r in p["rows"]],
    }
    (out / f"e2e_{tag}.json").write_text(json.dumps(merged, indent=1))
    (out / f"e2e_{tag}.md").write_text(markdown(merged))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--merge", nargs="+", help="result files of earlier calls to join")
    p.add_argument("--note", action="append", help="a line for the merged report (repeatable)")
    p.add_argument("--tag", default="h100")
    p.add_argument("--variants", default="bf16,nf4,w4,w4_head")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--modes", default="compiled,eager")
    p.add_argument("--eager-batches", default="1")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eager-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args.merge, out, args.tag, args.note)
        return
    unknown = [v for v in args.variants.split(",") if base_variant(v) not in QUANT]
    if unknown:
        sys.exit(
            f"unknown variant(s) {','.join(unknown)}: valid are {', '.join(QUANT)}, "
            f"each also with the suffix {FUSED_NORM}"
        )
    torch._dynamo.config.cache_size_limit = 64
    batches = [int(b) for b in args.batches.split(",")]
    eager_batches = [int(b) for b in args.eager_batches.split(",")]
    result = result_header(
        "bench/e2e_decode.py (qpipe.evaluation.decode.measure)", args=vars(args), rows=[]
    )

    def save() -> None:
        (out / f"e2e_{args.tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"e2e_{args.tag}.md").write_text(markdown(result))

    for variant in args.variants.split(","):
        plan = [(m, batches if m == "compiled" else eager_batches) for m in args.modes.split(",")]
        run_variant(variant, plan, args, result["rows"], save)


if __name__ == "__main__":
    main()
