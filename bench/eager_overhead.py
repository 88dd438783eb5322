"""What an eager (uncompiled) 4-bit decode step spends on the host, before and after:

    python bench/eager_overhead.py [--out DIR] [--layers 4] [--calls 2000]

1. Host µs per call at M = 1 (bf16, asymmetric int4 g128; no sync inside the timed loop) on
   Qwen3-8B's layer shapes, fused q/k/v and gate/up included: ``F.linear``; QuantLinear on
   the fragment kernel (layout v3: ``FragLauncher``, one ``cuLaunchKernel``); QuantLinear on
   today's Triton kernels (tiles, v2: ``DirectLauncher``, or Triton's own launch path where
   that launcher is refused, with the reason); and the op's path without a bound launcher
   (the tuner's lookup + the launch: what every call paid before launchers existed).
2. An eager greedy decode of Qwen3-8B's architecture cut to ``--layers`` layers (random
   weights; qpipe's decode loop, ``compiled=False``): bf16, W4 on the fragment kernel, W4 on the
   Triton kernels: ms per token, and cProfile's top functions of the W4 step.
Writes DIR/eager_overhead_<card>.json/.md (bench/harness.py); prints the table last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402

from qpipe.kernels import QuantLinear  # noqa: E402
from qpipe.kernels.fusion import concat  # noqa: E402

# Qwen3-8B at M = 1: (the projections' output widths, K) of o, fused q/k/v, fused gate/up, down
SHAPES = {
    "o_proj 4096x4096": ([4096], 4096),
    "qkv fused 6144x4096": ([4096, 1024, 1024], 4096),
    "gate_up fused 24576x4096": ([12288, 12288], 4096),
    "down 4096x12288": ([4096], 12288),
}


def _layer(parts: list[int], k: int, form: str) -> torch.nn.Module:
    """A QuantLinear (fused, as the load stage fuses them, where ``parts`` has several) held
    in ``form``."""
    mods = []
    for n in parts:
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        mods.append(QuantLinear.from_linear(lin, group_size=128, symmetric=False, kernel="triton"))
    q = concat(mods) if len(mods) > 1 else mods[0]
    q.convert_form(form)
    return q


def host_us(fn, x, calls: int) -> float:
    fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def per_call(calls: int, log=print) -> list[dict]:
    from qpipe.kernels.frag_w4a16 import unavailable
    from qpipe.kernels.triton_w4a16 import DirectLauncher
    from qpipe.kernels.tuning import w4a16_matmul

    rows = []
    frag_reason = unavailable(torch.device("cuda"))
    for label, (outs, k) in SHAPES.items():
        n = sum(outs)
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        with torch.inference_mode():
            row = {"shape": label, "F.linear": host_us(lin, x, calls)}
            for form in ("frag", "tiled"):
                if form == "frag" and frag_reason is not None:
                    row["frag"] = None
                    continue
                q = _layer(outs, k, form)
                DirectLauncher.refused = None
                row[form] = host_us(q, x, calls)
                launcher = next(iter(q._launchers.values()), None)
                row[f"{form} launcher"] = type(launcher).__name__ if launcher else "none"
                if form == "tiled":
                    row["tiled refused"] = DirectLauncher.refused
                    args = (q.qweight, q.scales, q.zeros, q.group_size, q.bias)
                    row["op path"] = host_us(lambda x_, a=args: w4a16_matmul(x_, *a), x, calls)
                del q
        rows.append(row)
        log(row)
    return rows


def _profile(model, inputs, new: int) -> str:
    from qpipe.evaluation import decode

    prof = cProfile.Profile()
    prof.enable()
    decode.measure(model, inputs, new, compiled=False, repeats=1)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def decode_step(layers: int, new: int, log=print) -> list[dict]:
    """Eager decode of Qwen3-8B's architecture, ``layers`` layers, batch 1, 128-token prompt."""
    import e2e_decode
    from transformers import AutoModelForCausalLM

    from qpipe.config.compose import load_model_group
    from qpipe.evaluation import decode
    from qpipe.models.source import load_config

    config = load_config(load_model_group("qwen3_8b"))
    config.num_hidden_layers = layers
    rows = []
    prompt = torch.randint(
        0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)
    )
    inputs = {"input_ids": prompt.cuda()}
    for variant in ("bf16", "w4 frag", "w4 tiled (Triton)"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        if variant != "bf16":
            e2e_decode.to_w4(model, with_head=False)
            form = "frag" if "frag" in variant else "tiled"
            for m in model.modules():
                if isinstance(m, QuantLinear) and m.form != "rows":
                    m.convert_form(form)
        t = decode.measure(model, inputs, new, compiled=False, repeats=3)
        forms = sorted({m.form for m in model.modules() if isinstance(m, QuantLinear)})
        row = {"variant": variant, "layers": layers, "ms_per_token": t.decode_ms_per_token,
               "tok_s": t.decode_tok_s, "forms": forms}  # fmt: skip
        if variant != "bf16":
            row["profile"] = _profile(model, inputs, min(new, 8))
        rows.append(row)
        log(f"{variant}: {t.decode_ms_per_token:.2f} ms/token eager ({layers} layers)")
        del model
        torch.cuda.empty_cache()
    return rows


def markdown(result: dict) -> str:
    lines = harness.markdown_heading("Eager QuantLinear host overhead", result)
    lines += [
        "Host µs per call at M = 1, bf16, asymmetric int4 g128, 2000 calls without a sync "
        "(the GPU queue absorbs them: this is what eager decoding pays per layer). frag: "
        "layout v3 on the fragment kernel; tiled: layout v2 on the Triton kernels; op path: "
        "the tuner's lookup and Triton's launch, no bound launcher.",
        "",
        "| shape | F.linear | frag | tiled | op path | frag launcher | tiled launcher |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(v):
        return f"{v:.1f}" if isinstance(v, float) else "n/a"

    for r in result["per_call"]:
        lines.append(
            f"| {r['shape']} | {f(r['F.linear'])} | {f(r.get('frag'))} | {f(r.get('tiled'))} | "
            f"{f(r.get('op path'))} | {r.get('frag launcher', 'n/a')} | "
            f"{r.get('tiled launcher', 'n/a')} |"
        )
    refused = {r.get("tiled refused") for r in result["per_call"]} - {None}
    if refused:
        lines += ["", "DirectLauncher refused: " + "; ".join(sorted(refused))]
    if result.get("decode"):
        lines += ["", "Eager decode, Qwen3-8B architecture cut to "
                  f"{result['decode'][0]['layers']} layers, batch 1:", "",
                  "| weights | ms/token | tok/s | forms held |", "|---|---|---|---|"]  # fmt: skip
        for r in result["decode"]:
            lines.append(f"| {r['variant']} | {r['ms_per_token']:.2f} | {r['tok_s']:.1f} | "
                         f"{', '.join(r['forms']) or '-'} |")  # fmt: skip
        for r in result["decode"]:
            if r.get("profile"):
                lines += ["", f"cProfile of the {r['variant']} eager decode (top by own time):",
                          "", "```", r["profile"].strip()[-3500:], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def cpu_dispatch(calls: int, log=print) -> dict:
    """On a machine without a GPU: the Python each eager call runs, its kernel stubbed where
    the work would go to the device (µs per call, this CPU). ``module``: QuantLinear.forward
    around a bound launcher that only allocates the output, through the general path (as every
    call went before) and the fast path; ``bound launch``: the fragment
    launcher's own Python (pointer writes, stream lookup) with ``cuLaunchKernel`` replaced by a
    ctypes call of the same argument count; ``op path``: ``w4a16_matmul``'s tuner lookup and
    launch plan with the Triton launch itself stubbed."""
    import ctypes

    from qpipe.kernels import cuda_rtc, quantize_rtn, triton_w4a16

    iw = quantize_rtn(torch.randn(4096, 4096), group_size=128, symmetric=False)
    q = QuantLinear.from_int(iw, dtype=torch.float16, kernel="triton")
    q.convert_form("tiled")
    x = torch.randn(1, 4096, dtype=torch.float16)

    class Stub:
        def takes(self, x_):
            return True

        def __call__(self, x_):
            return torch.empty(x_.shape[0], 4096, dtype=x_.dtype)

    q._checked = (x.device, x.dtype)
    q._launchers[(x.numel(), x.dtype, x.get_device())] = Stub()
    q._direct = False  # the general path (reshape, input preparation, checks), as before
    out = {"module, general path": host_us_cpu(q, x, calls)}
    q._direct = True  # forward's fast path
    out["module, fast path"] = host_us_cpu(q, x, calls)
    out["the stub alone (torch.empty)"] = host_us_cpu(Stub(), x, calls)

    libc = ctypes.CDLL(None)  # a C function taking the launch's 11 arguments: snprintf's
    libc.snprintf.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p] + [
        ctypes.c_void_p
    ] * 8
    buf = ctypes.create_string_buffer(8)
    bound = cuda_rtc.BoundLaunch.__new__(cuda_rtc.BoundLaunch)
    bound._vals = [ctypes.c_void_p(0) for _ in range(8)] + [ctypes.c_int(0) for _ in range(7)]
    bound._params = (ctypes.c_void_p * 15)(*[ctypes.addressof(v) for v in bound._vals])

    def launch_stub():
        bound.set_pointer(0, x.data_ptr())
        bound.set_pointer(5, x.data_ptr())
        libc.snprintf(buf, 0, b"", None, 1, 1, 1, 128, 1, 1, bound._params)

    out["bound launch"] = host_us_cpu(lambda _: launch_stub(), x, calls)
    real = triton_w4a16.launch
    triton_w4a16_launch_calls = []

    def stub_launch(x_, *args, **kw):
        triton_w4a16_launch_calls.append(1)
        return torch.empty(x_.shape[0], 4096, dtype=x_.dtype)

    from qpipe.kernels import tuning

    tuning.launch = stub_launch
    try:
        args = (q.qweight, q.scales, q.zeros, q.group_size, q.bias)
        out["op path"] = host_us_cpu(lambda x_: tuning.w4a16_matmul(x_, *args), x, calls)
    finally:
        tuning.launch = real
    out["F.linear (CPU matmul, for scale)"] = host_us_cpu(
        torch.nn.Linear(4096, 16, dtype=torch.float16), x, calls
    )
    log(out)
    return out


def host_us_cpu(fn, x, calls: int) -> float:
    fn(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else print only")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=4, help="0: skip the decode step")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--cpu-dispatch", action="store_true",
                    help="no GPU: time the Python of each path with the kernels stubbed")  # fmt: skip
    args = ap.parse_args()
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if args.cpu_dispatch:
        load = os.getloadavg()[0]  # a shared machine: the absolute numbers move with it
        result = harness.result_header(
            cpu_dispatch=cpu_dispatch(args.calls), calls=args.calls, load_average=load
        )
        lines = harness.markdown_heading("Eager dispatch, kernels stubbed", result)
        doc = " ".join(ln.strip() for ln in cpu_dispatch.__doc__.split("\n"))
        lines += [doc, "", f"{args.calls} calls each; load average {load:.1f} when it ran.", "",
                  "| path | µs per call |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.1f} |" for k, v in result["cpu_dispatch"].items()]
        if out:
            harness.write_result("eager_dispatch_cpu", result, lines, out)
        print("\n".join(lines))
        return
    if not torch.cuda.is_available():
        sys.exit("eager_overhead.py needs a CUDA device (or --cpu-dispatch)")
    result = harness.result_header()
    result["per_call"] = per_call(args.calls)
    result["decode"] = decode_step(args.layers, args.new_tokens) if args.layers else []
    md = markdown(result)
    if out:
        harness.write_result(
            f"eager_overhead_{harness.card_slug(result['device'])}", result, md, out
        )
    print(md)


if __name__ == "__main__":
    main()
