"""W4A16 / W8A16 benchmark: fp16 cuBLAS vs torch tinygemm int4 vs bitsandbytes nf4 vs qpipe's
Triton kernels (``qpipe``: 4-bit, ``qpipe_w8``: 8-bit), each with the bytes/s it streams.

    python bench/kernel_bench.py --out bench/results --tag h100
    python bench/kernel_bench.py --sweep          # time explicit kernel configs (tuning aid)

Timing: each implementation gets R copies of its weights (enough that R copies exceed 3x the
L2 cache, so every call streams its weights from HBM: the L2 is not flushed, it is outrun);
one CUDA graph calls the layer once per copy; the graph is replayed many times and the median
replay time / R is the time of one call. Launch overhead is therefore amortised as it would be
in a graph-captured decoder. Achieved bandwidth counts the bytes each call must move (weights +
scales/zeros + activations in + out) over that time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288), (24576, 4096)]  # N x K
MS = [1, 4, 16, 64]
GROUP = 128
NOMINAL_COPY_GBS = 3000.0  # H100 SXM device-to-device copy, read + write, as measured here


@dataclass
class Impl:
    name: str
    calls: list[Callable[[], torch.Tensor]]  # one per weight copy
    bytes_per_call: int
    note: str = ""
    check: Callable[[], float] | None = None  # relative error vs the fp32 reference


@dataclass
class Result:
    shape: tuple[int, int]
    m: int
    impl: str
    us: float | None
    gbs: float | None = None
    error: str | None = None
    rel_err: float | None = None
    extra: dict = field(default_factory=dict)


def _sync() -> None:
    torch.cuda.synchronize()


def time_calls(calls: list[Callable[[], object]], replays: int = 30) -> float:
    """Median µs per call over graph replays of all calls (see the module docstring)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    _sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        graph.replay()
        e.record()
    _sync()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    del graph
    return times[len(times) // 2] * 1000.0 / len(calls)


def n_copies(bytes_per_copy: int, l2_bytes: int) -> int:
    return max(2, min(64, math.ceil(3 * l2_bytes / max(bytes_per_copy, 1))))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, bytes read + written per second (the practical HBM ceiling)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_calls([lambda: b.copy_(a)], replays=20)
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


# -- implementations ------------------------------------------------------------------------


def make_fp16(w: torch.Tensor, xs: dict, copies: int) -> Impl:
    ws = [w.clone() for _ in range(copies)]
    x = xs["fp16"]
    n, k = w.shape
    return Impl(
        "fp16",
        [lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in ws],
        n * k * 2 + x.numel() * 2 + x.shape[0] * n * 2,
        note="torch.nn.functional.linear (cuBLAS), fp16",
    )


def qpipe_modules(iw, copies: int) -> list:
    from qpipe.kernels import QuantLinear

    return [QuantLinear.from_int(iw, kernel="triton", dtype=torch.float16) for _ in range(copies)]


def make_qpipe_w8(w: torch.Tensor, xs: dict, copies: int, ref8: torch.Tensor) -> Impl:
    """Int8Linear(kernel='triton'): symmetric int8, group 128, the 8-bit layers' kernel."""
    from qpipe.kernels import quantize_rtn
    from qpipe.kernels.int8_linear import Int8Linear

    x = xs["fp16"]
    iw8 = quantize_rtn(w, group_size=GROUP, bits=8, symmetric=True, scale_dtype=torch.float16)
    mods = [Int8Linear(iw8, None, torch.float16, kernel="triton").cuda() for _ in range(copies)]
    q = mods[0]
    n = q.out_features
    nbytes = q.qweight.numel() + q.scales.numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2
    calls = [lambda m_=m_: m_(x) for m_ in mods]
    return Impl(
        "qpipe_w8",
        calls,
        nbytes,
        note="Int8Linear(kernel='triton'), sym int8 g128, fp16 activations",
        check=lambda: rel_err(calls[0](), ref8),
    )


def make_fp8(w: torch.Tensor, xs: dict, copies: int) -> Impl:
    """Fp8Linear(kernel='scaled_mm'): e4m3 weights per output channel, activations quantized
    per token in the call (W8A8 dynamic, quant=fp8's layers), bf16 in and out. Its error is
    against the bf16 activations times the e4m3 weights (the activations' rounding included)."""
    from qpipe.kernels.fp8_linear import Fp8Linear, quantize_per_channel

    x = xs["bf16"]
    q, scale = quantize_per_channel(w)
    mods = [Fp8Linear(q, scale, None, torch.bfloat16, kernel="scaled_mm") for _ in range(copies)]
    n, k = w.shape
    ref = x.float() @ (q.float() * scale[:, None]).t()
    calls = [lambda m_=m_: m_(x) for m_ in mods]
    return Impl(
        "fp8",
        calls,
        n * k + n * 4 + x.numel() * 2 + x.shape[0] * n * 2,
        note="Fp8Linear(kernel='scaled_mm'): torch._scaled_mm, e4m3, per-token activations",
        check=lambda: rel_err(calls[0](), ref),
    )


def make_qpipe(mods: list, xs: dict, ref: torch.Tensor | None, cfg=None, qweights=None) -> Impl:
    """``qweights``: the modules' words in another form (row-major or tiled), for sweeps."""
    from qpipe.kernels.tuning import w4a16_matmul

    x = xs["fp16"]
    q = mods[0]
    n = q.out_features
    nbytes = q.qweight.numel() * 4 + q.scales.numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2
    if cfg is None:
        calls = [lambda m_=m_: m_(x) for m_ in mods]
    else:
        qws = qweights or [m_.qweight for m_ in mods]
        calls = [
            lambda m_=m_, w_=w_: w4a16_matmul(x, w_, m_.scales, m_.zeros, m_.group_size, cfg=cfg)
            for m_, w_ in zip(mods, qws, strict=True)
        ]
    return Impl(
        "qpipe",
        calls,
        nbytes,
        note="QuantLinear(kernel='triton'), sym int4 g128, fp16 activations, autotuned",
        check=None if ref is None else (lambda: rel_err(calls[0](), ref)),
    )


def _tinygemm_pack(iw, inner_k_tiles: int = 8):
    """Our symmetric int4 weights in tinygemm's format: (q - 8) * scale + zero with zero = 0."""
    q = iw.q.cuda().to(torch.int32)
    n, k = q.shape
    try:  # torch >= 2.5: uint8 [N, K/2], even column in the high nibble
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        w_packed = torch._convert_weight_to_int4pack(packed_u8, inner_k_tiles)
    except (RuntimeError, TypeError):  # older torch: int32 [N, K]
        w_packed = torch._convert_weight_to_int4pack(q, inner_k_tiles)
    s = iw.scales.t().to(torch.bfloat16).cuda()  # [G, N]
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()  # [G, N, 2]
    return w_packed, sz


def make_tinygemm(iw, xs: dict, copies: int, ref: torch.Tensor) -> Impl:
    x = xs["bf16"]
    packs = [_tinygemm_pack(iw) for _ in range(copies)]
    n, k = iw.shape

    def call(p):
        return torch._weight_int4pack_mm(x, p[0], GROUP, p[1])

    return Impl(
        "tinygemm",
        [lambda p=p: call(p) for p in packs],
        n * k // 2 + packs[0][1].numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2,
        note="torch._weight_int4pack_mm, bf16 activations, g128, inner_k_tiles=8",
        check=lambda: rel_err(call(packs[0]), ref),
    )


def make_bnb(w: torch.Tensor, xs: dict, copies: int) -> Impl:
    import bitsandbytes as bnb

    x = xs["fp16"]
    qs = [bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4") for _ in range(copies)]
    n, k = w.shape
    deq = bnb.functional.dequantize_4bit(qs[0][0], qs[0][1]).float()
    ref = x.float() @ deq.t()
    absmax_bytes = qs[0][1].absmax.numel() * qs[0][1].absmax.element_size()
    return Impl(
        "bnb_nf4",
        [lambda p=p: bnb.matmul_4bit(x, p[0].t(), quant_state=p[1]) for p in qs],
        n * k // 2 + absmax_bytes + x.numel() * 2 + x.shape[0] * n * 2,
        note=f"bitsandbytes {bnb.__version__} matmul_4bit nf4, blocksize 64, fp16",
        check=lambda: rel_err(bnb.matmul_4bit(x, qs[0][0].t(), quant_state=qs[0][1]), ref),
    )


# -- driver --------------------------------------------------------------------------------


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    try:
        import bitsandbytes

        bnb_v = bitsandbytes.__version__
    except ImportError:
        bnb_v = None
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", 50 * 2**20),
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bnb_v,
        "python": platform.python_version(),
        "command": "python bench/kernel_bench.py " + shlex.join(sys.argv[1:]),
    }


def run(shapes, ms, impls: list[str], replays: int, log=print) -> tuple[dict, list[Result]]:
    from qpipe.kernels import quantize_rtn

    env = environment()
    l2 = env["l2_bytes"]
    env["copy_gbs"] = copy_bandwidth_gbs()
    log(f"# {env['device']}  copy bandwidth {env['copy_gbs']:.0f} GB/s")
    results: list[Result] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
        iw = quantize_rtn(w, group_size=GROUP, symmetric=True, scale_dtype=torch.float16)
        w_deq = iw.dequantize().cuda()
        w8_deq = None
        if "qpipe_w8" in impls:
            iw8 = quantize_rtn(w, group_size=GROUP, bits=8, symmetric=True)
            w8_deq = iw8.dequantize().cuda()
        mods = None
        for m in ms:
            x16 = torch.randn(m, k, device="cuda", generator=gen).half()
            xs = {"fp16": x16, "bf16": x16.bfloat16()}
            ref = x16.float() @ w_deq.t()
            for name in impls:
                t0 = time.time()
                try:
                    if name == "fp16":
                        impl = make_fp16(w, xs, n_copies(n * k * 2, l2))
                    elif name == "qpipe":
                        mods = mods or qpipe_modules(iw, n_copies(n * k // 2, l2))
                        impl = make_qpipe(mods, xs, ref)
                    elif name == "qpipe_w8":
                        ref8 = x16.float() @ w8_deq.t()
                        impl = make_qpipe_w8(w, xs, n_copies(n * k, l2), ref8)
                    elif name == "fp8":
                        impl = make_fp8(w, xs, n_copies(n * k, l2))
                    elif name == "tinygemm":
                        impl = make_tinygemm(iw, xs, n_copies(n * k // 2, l2), ref)
                    elif name == "bnb_nf4":
                        impl = make_bnb(w, xs, n_copies(n * k // 2, l2))
                    else:
                        raise ValueError(name)
                    err = impl.check() if impl.check else None
                    us = time_calls(impl.calls, replays)
                    r = Result((n, k), m, name, us, impl.bytes_per_call / (us * 1e-6) / 1e9)
                    r.rel_err, r.extra = err, {"note": impl.note, "copies": len(impl.calls)}
                    if name == "qpipe":  # which kernel the tuner chose for this shape and M
                        from qpipe.kernels.tuning import TUNER, Tuner

                        q = mods[0]
                        x_in = q._prepare_input(x16)
                        key = Tuner.key(x_in, n, k, GROUP, q.zeros is not None, q.tiled)
                        chosen = TUNER.best.get(key)
                        r.extra["config"] = chosen.as_dict() if chosen else None
                    del impl
                except Exception as e:  # one broken baseline must not sink the whole table
                    r = Result((n, k), m, name, None, error=f"{type(e).__name__}: {e}"[:300])
                results.append(r)
                msg = f"{n}x{k} M={m:<3} {name:<9} "
                msg += f"{r.us:8.2f} us {r.gbs:7.0f} GB/s" if r.us else f"FAILED {r.error}"
                if r.rel_err is not None:
                    msg += f"  rel_err {r.rel_err:.1e}"
                if r.extra.get("config"):
                    msg += f"  {r.extra['config']['kind']}"
                log(msg + f"  ({time.time() - t0:.1f}s)")
        del mods
        torch.cuda.empty_cache()
    return env, results


def markdown(env: dict, results: list[Result]) -> str:
    by = {(r.shape, r.m, r.impl): r for r in results}
    impls = [
        i
        for i in ("fp16", "tinygemm", "bnb_nf4", "qpipe", "qpipe_w8", "fp8")
        if any(r.impl == i for r in results)
    ]
    streams = [i for i in ("fp16", "qpipe", "qpipe_w8", "fp8") if i in impls]
    lines = [
        f"# W4A16 benchmark: {env['device']}",
        "",
        f"driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton "
        f"{env['triton']}, bitsandbytes {env['bitsandbytes']}; measured copy bandwidth "
        f"{env['copy_gbs']:.0f} GB/s (read + write).",
        f"Command: `{env['command']}`",
        "",
        "Times in µs per call (median of CUDA-graph replays over rotating weight copies that "
        "outrun the L2: weights come from HBM). `x` = speed-up over fp16 cuBLAS "
        "(t_fp16 / t_impl). GB/s = bytes the call must move / time. Weights: symmetric int4, "
        "group 128 (tinygemm the same integers; bnb nf4 blocksize 64); qpipe_w8: symmetric "
        "int8, group 128, on qpipe's W8A16 kernel; fp8: e4m3 per channel, bf16 activations "
        "quantized per token in the call (torch._scaled_mm).",
        "",
        "| N x K | M | " + " | ".join(f"{i} µs" for i in impls) + " | "
        + " | ".join(f"{i} x" for i in impls if i != "fp16") + " | "
        + " | ".join(f"{i} GB/s" for i in streams) + " |",
        "|" + "---|" * (2 + len(impls) + len(impls) - 1 + len(streams)),
    ]  # fmt: skip
    for shape in dict.fromkeys(r.shape for r in results):
        for m in dict.fromkeys(r.m for r in results if r.shape == shape):
            base = by.get((shape, m, "fp16"))
            cells, ratios = [], []
            for i in impls:
                r = by.get((shape, m, i))
                cells.append(f"{r.us:.2f}" if r and r.us else "n/a")
                if i != "fp16":
                    ok = r and r.us and base and base.us
                    ratios.append(f"{base.us / r.us:.2f}" if ok else "n/a")
            gbs = []
            for i in streams:
                r = by.get((shape, m, i))
                gbs.append(f"{r.gbs:.0f}" if r and r.gbs else "n/a")
            lines.append(
                f"| {shape[0]}x{shape[1]} | {m} | " + " | ".join(cells) + " | "
                + " | ".join(ratios) + " | " + " | ".join(gbs) + " |"
            )  # fmt: skip
    errs = [r for r in results if r.error]
    if errs:
        lines += ["", "Failures:"] + [f"- {r.impl} {r.shape} M={r.m}: {r.error}" for r in errs]
    return "\n".join(lines) + "\n"


def sweep(shapes, ms, replays: int, log=print, layouts=("rows",), kinds=None) -> list[dict]:
    """Time explicit kernel configurations (tuning aid; not part of the result table), for each
    weight layout: "rows" (row-major words) and "tiled" (layout.tile_w4's 1 KB tiles)."""
    from qpipe.kernels import quantize_rtn
    from qpipe.kernels.layout import tile_w4
    from qpipe.kernels.triton_w4a16 import KernelConfig

    l2 = environment()["l2_bytes"]
    rows = []
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda") * 0.02).half()
        iw = quantize_rtn(w, group_size=GROUP, symmetric=True, scale_dtype=torch.float16)
        mods = qpipe_modules(iw, n_copies(n * k // 2, l2))
        rows_form = [m_.qweight_rows() for m_ in mods]
        forms = {"rows": rows_form}
        if "tiled" in layouts:  # a second copy of every weight only when it is timed
            forms["tiled"] = [tile_w4(w_) for w_ in rows_form]
        for m in ms:
            x = torch.randn(m, k, device="cuda").half()
            cfgs = []
            if m <= 4:
                for bn in (32, 64, 128):
                    for warps in (2, 4):
                        for split in (1, 2, 4, 8, 16, 32):
                            for depth in (2, 3) if bn == 32 else (2,):
                                cfgs.append(
                                    KernelConfig("gemv", bn, 128, split, 1, warps, 1, depth)
                                )
            for bm in (max(16, min(64, 1 << max(0, (m - 1).bit_length()))),):
                for bn, warps in ((64, 4), (128, 4), (128, 8)):
                    for stages in (3, 4):
                        for split in (1, 2, 4, 8):
                            cfgs.append(KernelConfig("mm", bn, 128, split, bm, warps, stages))
                for bn, warps in ((64, 4), (128, 4), (128, 8)):
                    for stages in (2, 3):
                        for split in (1, 2, 4, 8):
                            cfgs.append(KernelConfig("mmp", bn, 128, split, bm, warps, stages))
            if kinds:
                cfgs = [c for c in cfgs if c.kind in kinds]
            ref = x.float() @ iw.dequantize().t()
            best: dict[str, tuple[float, KernelConfig]] = {}
            for cfg in cfgs:
                for layout in layouts:
                    try:
                        impl = make_qpipe(mods, {"fp16": x}, ref, cfg=cfg, qweights=forms[layout])
                        err = impl.check()
                        us = time_calls(impl.calls, replays)
                    except Exception as e:
                        log(f"  {layout} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    if not err < 1e-2:
                        log(f"  {layout} {cfg} WRONG: rel_err {err:.2e}")
                        continue
                    rows.append(
                        {"shape": [n, k], "m": m, "layout": layout, "cfg": cfg.as_dict(),
                         "us": us, "err": err}
                    )  # fmt: skip
                    key = f"{layout} {cfg.kind}"
                    if key not in best or us < best[key][0]:
                        best[key] = (us, cfg)
            for key, (us, cfg) in sorted(best.items()):
                log(f"{n}x{k} M={m:<3} best {key}: {us:7.2f} us  {cfg}")
    return rows


def sweep_w8(shapes, ms, replays: int, log=print) -> list[dict]:
    """Time explicit W8A16 configurations around the heuristic (tuning aid)."""
    from qpipe.kernels import quantize_rtn
    from qpipe.kernels.triton_w8a16 import W8Config, heuristic, w8a16_matmul

    l2 = environment()["l2_bytes"]
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
        iw8 = quantize_rtn(w, group_size=GROUP, bits=8, symmetric=True, scale_dtype=torch.float16)
        copies = n_copies(n * k, l2)
        qs = [iw8.q.to(torch.uint8).cuda() for _ in range(copies)]
        s = iw8.scales.half().cuda()
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen).half()
            base = heuristic(m, n, k, GROUP, x.device)
            splits = sorted({max(1, base.split_k // 2), base.split_k, base.split_k * 2})
            for bn in (64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        for split in splits:
                            cfg = W8Config(base.block_m, bn, base.block_k, split, warps, stages)
                            calls = [
                                lambda q_=q_, c=cfg, x=x, s=s: w8a16_matmul(
                                    x, q_, s, None, GROUP, cfg=c
                                )
                                for q_ in qs
                            ]
                            try:
                                us = time_calls(calls, replays)
                            except Exception as e:  # a config this GPU cannot run
                                log(f"{n}x{k} M={m} {cfg} FAILED {type(e).__name__}")
                                continue
                            gbs = (n * k + s.numel() * 2) / (us * 1e-6) / 1e9
                            rows.append({"shape": [n, k], "m": m, "us": us, "gbs": gbs,
                                         "cfg": cfg.__dict__, "heuristic": cfg == base})  # fmt: skip
            best = min((r for r in rows if r["shape"] == [n, k] and r["m"] == m),
                       key=lambda r: r["us"])  # fmt: skip
            log(f"{n}x{k} M={m} best {best['us']:.2f} us {best['gbs']:.0f} GB/s {best['cfg']}")
        del qs
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON + markdown")
    ap.add_argument("--tag", default="gpu", help="file name suffix: w4a16_<tag>.json/.md")
    ap.add_argument("--impls", default="fp16,tinygemm,bnb_nf4,qpipe,qpipe_w8")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="time explicit kernel configs")
    ap.add_argument("--sweep-w8", action="store_true", help="time explicit W8A16 configs")
    ap.add_argument("--layouts", default="rows", help="--sweep: rows,tiled (layout.tile_w4)")
    ap.add_argument("--kinds", default="", help="--sweep: only these kernel kinds (gemv,mm,mmp)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA device")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    if args.sweep_w8:
        rows = sweep_w8(shapes, ms, args.replays)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"sweep_w8_{args.tag}.json").write_text(json.dumps(rows))
        return
    if args.sweep:
        layouts = tuple(args.layouts.split(","))
        kinds = tuple(k for k in args.kinds.split(",") if k)
        rows = sweep(shapes, ms, args.replays, layouts=layouts, kinds=kinds)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"sweep_{args.tag}.json").write_text(json.dumps(rows))
        return
    env, results = run(shapes, ms, args.impls.split(","), args.replays)
    md = markdown(env, results)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"env": env, "results": [r.__dict__ for r in results]}
        (args.out / f"w4a16_{args.tag}.json").write_text(json.dumps(data, indent=1))
        (args.out / f"w4a16_{args.tag}.md").write_text(md)


if __name__ == "__main__":
    main()
