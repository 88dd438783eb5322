"""Where a compiled decode step's time goes: every GPU kernel of a few CUDA-graph-replayed
greedy steps (torch.profiler), grouped by kind, for each variant of ``e2e_decode.py``.

    python bench/decode_profile.py --out DIR [--variants bf16,w4] [--steps 16]

Writes DIR/profile_<tag>.json: per variant the wall time per step, the kernels per step, the
GPU time per step by kind (our W4A16 kernels, cuBLAS GEMMs, attention, Inductor's fused
kernels, other), the idle gap between them, the heaviest kernels, and one step's kernel
sequence in order (so per-layer shapes can be told apart).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_decode  # noqa: E402

from qpipe.evaluation import decode  # noqa: E402
from qpipe.evaluation.attention import grouped_attention  # noqa: E402

KINDS = (
    ("w4a16", r"_gemv_kernel|_mm_kernel"),
    ("bnb", r"kgemm_4bit|kDequantize|bnb"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce|sm90_"),
    ("attention", r"flash|fmha|attention|efficient"),
    ("inductor", r"^triton_"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def profile_variant(variant: str, prompt: int, steps: int) -> dict:
    model = e2e_decode.build_variant(variant)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen).cuda()
    torch._dynamo.reset()
    decoder = decode.StaticDecoder(model, prompt + 2 * steps + 8, compiled=True)
    with torch.inference_mode(), grouped_attention(model):
        compile_s = decode.warm_up(decoder, {"input_ids": ids})
        first = decoder.prefill({"input_ids": ids})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decoder.continue_from(first, prompt, steps)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / steps * 1e3
        first = decoder.prefill({"input_ids": ids})
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder.continue_from(first, prompt, steps)
            torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type == DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        us = e.time_range.elapsed_us()
        by_kind[kind_of(e.name)] += us / steps
        by_name[e.name][0] += 1
        by_name[e.name][1] += us
    span_us = (kernels[-1].time_range.end - kernels[0].time_range.start) if kernels else 0.0
    busy = sum(by_kind.values())
    per_step = len(kernels) // max(steps, 1)
    one_step = [
        (e.name[:80], round(e.time_range.elapsed_us(), 2))
        for e in kernels[per_step * (steps // 2) : per_step * (steps // 2 + 1)]
    ]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    del model, decoder
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "variant": variant,
        "steps": steps,
        "compile_s": compile_s,
        "wall_ms_per_step": wall_ms,
        "kernels_per_step": len(kernels) / steps,
        "gpu_busy_us_per_step": busy,
        "span_us_per_step": span_us / steps,
        "idle_us_per_step": span_us / steps - busy,
        "us_per_step_by_kind": dict(by_kind),
        "top_kernels": [
            {"name": n[:120], "calls_per_step": c / steps, "us_per_step": t / steps}
            for n, (c, t) in top
        ],
        "one_step": one_step,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="h200")
    p.add_argument("--variants", default="bf16,w4")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    result = e2e_decode.result_header(
        "bench/decode_profile.py (qpipe.evaluation.decode.StaticDecoder, torch.profiler)",
        args=vars(args),
        variants=[],
    )
    for variant in args.variants.split(","):
        row = profile_variant(variant, args.prompt, args.steps)
        result["variants"].append(row)
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["us_per_step_by_kind"].items()))
        print(
            f"{variant}: {row['wall_ms_per_step']:.2f} ms/step wall, "
            f"{row['kernels_per_step']:.0f} kernels, busy {row['gpu_busy_us_per_step']:.0f} us, "
            f"idle {row['idle_us_per_step']:.0f} us; {kinds}",
            flush=True,
        )
        (out / f"profile_{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
