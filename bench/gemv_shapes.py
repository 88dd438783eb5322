"""The W4A16 kernel on the shapes a Qwen3-8B decode step runs (bf16 activations, asymmetric
int4 g128, the weights streamed from HBM), against bf16 cuBLAS, for each way the GEMV brings
activations into fp16 range (``triton_w4a16.XSCALE``): what a decode step's matmuls cost.

    python bench/gemv_shapes.py --out DIR [--ms 1,16] [--tag h200]

Writes DIR/gemv_<tag>.json: per shape, M and implementation the autotuned µs per call
(median of CUDA-graph replays over weight copies larger than the L2), GB/s of the bytes the
call must move, the winning configuration and the relative error against fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_decode  # noqa: E402
from kernel_bench import n_copies, rel_err, time_calls  # noqa: E402

from qpipe.kernels import QuantLinear, triton_w4a16  # noqa: E402
from qpipe.kernels.intweights import quantize_rtn  # noqa: E402
from qpipe.kernels.tuning import candidates  # noqa: E402

# N x K: q/o, k/v, fused qkv, gate/up, fused gate_up, down, lm_head
SHAPES = [
    (4096, 4096),
    (1024, 4096),
    (6144, 4096),
    (12288, 4096),
    (24576, 4096),
    (4096, 12288),
    (151936, 4096),
]


def bench_shape(n: int, k: int, m: int, replays: int) -> list[dict]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.t()
    rows = []
    wb = w.to(torch.bfloat16)
    copies = [wb] + [wb.clone() for _ in range(n_copies(n * k * 2, l2) - 1)]
    us = time_calls([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in copies], replays)
    rows.append({"impl": "bf16_cublas", "us": us, "gbs": n * k * 2 / us / 1e3})
    del copies
    iw = quantize_rtn(w, group_size=128, bits=4, symmetric=False, scale_dtype=torch.bfloat16)
    q = QuantLinear.from_int(iw, kernel="triton", dtype=torch.bfloat16)
    nbytes = q.qweight.numel() * 4 + q.scales.numel() * 2 + q.zeros.numel()
    mods = [q] + [
        QuantLinear.from_int(iw, kernel="triton", dtype=torch.bfloat16)
        for _ in range(n_copies(nbytes, l2) - 1)
    ]
    for mode in ("row", "word"):
        triton_w4a16.XSCALE = mode
        best = None
        for cfg in candidates(m, n, k, 128, x.device):
            calls = [
                lambda q_=q_, cfg=cfg: triton_w4a16.launch(
                    x, q_.qweight, q_.scales, q_.zeros, 128, None, cfg
                )
                for q_ in mods
            ]
            t = time_calls(calls, replays)
            if best is None or t < best[0]:
                best = (t, cfg)
        y = triton_w4a16.launch(x, q.qweight, q.scales, q.zeros, 128, None, best[1])
        rows.append(
            {
                "impl": f"qpipe_w4_{mode}",
                "us": best[0],
                "gbs": nbytes / best[0] / 1e3,
                "cfg": best[1].as_dict(),
                "rel_err_vs_fp32": rel_err(y, ref),
                "rel_err_of_dequantized_bf16": rel_err(x @ q.dequantize().to(x.dtype).t(), ref),
            }
        )
    del mods
    for r in rows:
        r.update(n=n, k=k, m=m)
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="h200")
    p.add_argument("--ms", default="1,16")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = e2e_decode.result_header("bench/gemv_shapes.py (kernel_bench.time_calls)", rows=[])
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.ms.split(",")):
            result["rows"] += bench_shape(n, k, m, args.replays)
            (out / f"gemv_{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
