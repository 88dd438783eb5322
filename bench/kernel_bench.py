"""W4A16 / W8A16 benchmark: fp16 cuBLAS vs torch tinygemm int4 vs bitsandbytes nf4 vs qpipe's
kernels (``qpipe``: 4-bit as QuantLinear runs it, ``qpipe_v2``: the Triton kernels on the v2
tiles, ``qpipe_w8``: 8-bit) vs GemLite and Marlin (``bench/peers.py``), each with the bytes/s
it streams and its error against the fp32 product of the same quantized weights.

    python bench/kernel_bench.py --out DIR --shapes all --ms 1,4,16,64   # kernels_<card>.json/.md
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
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qpipe, run from anywhere
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
#
# Each implementation prepares its weights once per shape (``setup``: the copies that outrun
# the L2) and binds them to each M's activations (``bind``), so packing is not repeated per M.


def _make_impl(name, calls, nbytes, note, check=None) -> Impl:
    return Impl(name, calls, nbytes, note=note, check=check)


class Fp16:
    name = "fp16"

    def setup(self, w, iw, l2):
        self.ws = [w.clone() for _ in range(n_copies(w.numel() * 2, l2))]

    def bind(self, xs, ref):
        x = xs["fp16"]
        n, k = self.ws[0].shape
        calls = [lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in self.ws]
        nbytes = n * k * 2 + x.numel() * 2 + x.shape[0] * n * 2
        return _make_impl(self.name, calls, nbytes, "torch.nn.functional.linear (cuBLAS), fp16")


class Qpipe:
    """QuantLinear(kernel='triton') as a user gets it (today the v2 tiles on the Triton kernels;
    the fragment kernel on layout v3 with QPIPE_FRAG=1). ``form`` forces a form: "tiled" is
    the v2 column (``qpipe_v2``), "frag" the fragment kernel's (``qpipe_frag``, where it runs;
    elsewhere its first call converts to tiles)."""

    def __init__(self, name: str = "qpipe", form: str | None = None) -> None:
        self.name = name
        self.form = form

    def setup(self, w, iw, l2):
        n, k = iw.shape
        self.mods = qpipe_modules(iw, n_copies(n * k // 2, l2))
        if self.form:
            for m_ in self.mods:
                m_.convert_form(self.form)
        self.iw = iw

    def bind(self, xs, ref):
        from qpipe.kernels.tuning import TUNER, Tuner

        x = xs["fp16"]
        q = self.mods[0]
        n = q.out_features
        nbytes = q.qweight.numel() * 4 + q.scales.numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2
        calls = [lambda m_=m_: m_(x) for m_ in self.mods]
        impl = _make_impl(
            self.name, calls, nbytes,
            f"QuantLinear(kernel='triton'), {q.form} weights, sym int4 g128, fp16, autotuned",
            lambda: rel_err(calls[0](), ref),
        )  # fmt: skip

        def config():
            # after the first call: the form the module settled in, the tuner's choice
            key = Tuner.key(q._prepare_input(x), n, q.k_padded, GROUP, q.zeros is not None, q.form)
            chosen = TUNER.best.get(key)
            return {"form": q.form, **(chosen.as_dict() if chosen else {})}

        impl.config = config
        return impl


class QpipeW8:
    name = "qpipe_w8"

    def setup(self, w, iw, l2):
        from qpipe.kernels import quantize_rtn
        from qpipe.kernels.int8_linear import Int8Linear

        iw8 = quantize_rtn(w, group_size=GROUP, bits=8, symmetric=True, scale_dtype=torch.float16)
        copies = n_copies(w.numel(), l2)
        self.mods = [Int8Linear(iw8, None, torch.float16, kernel="triton").cuda()
                     for _ in range(copies)]  # fmt: skip
        self.w8 = iw8.dequantize().cuda()

    def bind(self, xs, ref):
        x = xs["fp16"]
        q = self.mods[0]
        n = q.out_features
        ref8 = x.float() @ self.w8.t()
        nbytes = q.qweight.numel() + q.scales.numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2
        calls = [lambda m_=m_: m_(x) for m_ in self.mods]
        return _make_impl(
            self.name, calls, nbytes,
            "Int8Linear(kernel='triton'), sym int8 g128, fp16 activations",
            lambda: rel_err(calls[0](), ref8),
        )  # fmt: skip


class Fp8:
    """Fp8Linear as quant=fp8 loads it on the GPU: e4m3 weights per output channel, bf16 in
    and out; at M <= 4 the FP8 GEMV (weight-only, ``triton_fp8.py``), above it
    ``torch._scaled_mm`` with the activations quantized per token in the call (W8A8 dynamic).
    ``fp8_w8a8`` forces ``_scaled_mm`` at every M, so both paths stay visible. The error is
    against the bf16 activations times the e4m3 weights (W8A8's activation rounding included)."""

    def __init__(self, name: str = "fp8", gemv: bool = True) -> None:
        self.name = name
        self.gemv = gemv

    def setup(self, w, iw, l2):
        from qpipe.kernels.fp8_linear import Fp8Linear, quantize_per_channel

        q, scale = quantize_per_channel(w)
        self.mods = [Fp8Linear(q, scale, None, torch.bfloat16, "scaled_mm", gemv=self.gemv)
                     for _ in range(n_copies(w.numel(), l2))]  # fmt: skip
        self.w8 = q.float() * scale[:, None]

    def bind(self, xs, ref):
        from qpipe.kernels.fp8_linear import GEMV_MAX_M
        from qpipe.kernels.tuning import TUNER, Tuner

        x = xs["bf16"]
        n, k = self.w8.shape
        ref8 = x.float() @ self.w8.t()
        calls = [lambda m_=m_: m_(x) for m_ in self.mods]
        gemv = self.mods[0].gemv and x.shape[0] <= GEMV_MAX_M
        what = "the FP8 GEMV (weight-only)" if gemv else "torch._scaled_mm, per-token activations"
        impl = _make_impl(
            self.name, calls, n * k + n * 4 + x.numel() * 2 + x.shape[0] * n * 2,
            f"Fp8Linear ({self.mods[0].runs_on}): {what}, e4m3 per channel, bf16",
            lambda: rel_err(calls[0](), ref8),
        )  # fmt: skip
        if gemv:  # the tuner's launch, after the first call

            def config():
                chosen = TUNER.best.get("fp8|" + Tuner.key(x, n, k, 0, False))
                return chosen.as_dict() if chosen else {}

            impl.config = config
        return impl


class Tinygemm:
    name = "tinygemm"

    def setup(self, w, iw, l2):
        n, k = iw.shape
        self.packs = [_tinygemm_pack(iw) for _ in range(n_copies(n * k // 2, l2))]
        self.shape = (n, k)

    def bind(self, xs, ref):
        x = xs["bf16"]
        n, k = self.shape

        def call(p):
            return torch._weight_int4pack_mm(x, p[0], GROUP, p[1])

        nbytes = n * k // 2 + self.packs[0][1].numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2
        return _make_impl(
            self.name, [lambda p=p: call(p) for p in self.packs], nbytes,
            "torch._weight_int4pack_mm, bf16 activations, g128, inner_k_tiles=8",
            lambda: rel_err(call(self.packs[0]), ref),
        )  # fmt: skip


class BnbNf4:
    name = "bnb_nf4"

    def setup(self, w, iw, l2):
        import bitsandbytes as bnb

        self.bnb = bnb
        n, k = w.shape
        self.qs = [bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
                   for _ in range(n_copies(n * k // 2, l2))]  # fmt: skip
        self.deq = bnb.functional.dequantize_4bit(self.qs[0][0], self.qs[0][1]).float()
        self.shape = (n, k)

    def bind(self, xs, ref):
        bnb = self.bnb
        x = xs["fp16"]
        n, k = self.shape
        ref_nf4 = x.float() @ self.deq.t()
        absmax = self.qs[0][1].absmax
        nbytes = (
            n * k // 2 + absmax.numel() * absmax.element_size() + x.numel() * 2 + x.shape[0] * n * 2
        )
        calls = [lambda p=p: bnb.matmul_4bit(x, p[0].t(), quant_state=p[1]) for p in self.qs]
        return _make_impl(
            self.name, calls, nbytes,
            f"bitsandbytes {bnb.__version__} matmul_4bit nf4, blocksize 64, fp16",
            lambda: rel_err(calls[0](), ref_nf4),
        )  # fmt: skip


class Peer:
    """GemLite or Marlin (bench/peers.py): the same symmetric int4 g128 integers."""

    def __init__(self, name: str, gemlite_autotune: bool = False) -> None:
        self.name = name
        self.autotune = gemlite_autotune

    def setup(self, w, iw, l2):
        import peers

        if peers.unavailable(self.name):
            raise peers.PeerUnavailable(peers.unavailable(self.name))
        if self.name == "marlin":
            peers.build_marlin()
        else:
            peers._gemlite()  # an import failure skips the column here, once
        self.iw = iw
        self.copies = n_copies(iw.shape[0] * iw.shape[1] // 2, l2)
        self.state = {}  # Marlin packs once per shape, whatever M

    def bind(self, xs, ref):
        import peers

        x = xs["fp16"]
        if self.name == "gemlite":
            calls, nbytes, note, check = peers.make_gemlite(self.iw, x, self.copies, ref,
                                                            autotune=self.autotune)  # fmt: skip
        else:
            if "layers" not in self.state:
                self.state["layers"] = peers.marlin_layers(self.iw, self.copies, x.device)
            calls, nbytes, note, check = peers.marlin_calls(self.state["layers"], x, ref)
        return _make_impl(self.name, calls, nbytes, note, check)


def qpipe_modules(iw, copies: int) -> list:
    from qpipe.kernels import QuantLinear

    return [QuantLinear.from_int(iw, kernel="triton", dtype=torch.float16) for _ in range(copies)]


def make_qpipe(mods: list, xs: dict, ref: torch.Tensor | None, cfg=None, qweights=None) -> Impl:
    """(Sweeps) explicit kernel configurations on the modules' words in another form."""
    from qpipe.kernels.tuning import w4a16_matmul

    x = xs["fp16"]
    q = mods[0]
    n = q.out_features
    nbytes = q.qweight.numel() * 4 + q.scales.numel() * 2 + x.numel() * 2 + x.shape[0] * n * 2
    qws = qweights or [m_.qweight for m_ in mods]
    calls = [
        lambda m_=m_, w_=w_: w4a16_matmul(x, w_, m_.scales, m_.zeros, m_.group_size, cfg=cfg)
        for m_, w_ in zip(mods, qws, strict=True)
    ]
    return Impl(
        "qpipe", calls, nbytes, note="explicit configuration",
        check=None if ref is None else (lambda: rel_err(calls[0](), ref)),
    )  # fmt: skip


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


def implementations(names: list[str], gemlite_autotune: bool = False) -> list:
    known = {
        "fp16": Fp16,
        "tinygemm": Tinygemm,
        "bnb_nf4": BnbNf4,
        "qpipe": lambda: Qpipe(),
        "qpipe_v2": lambda: Qpipe("qpipe_v2", form="tiled"),
        "qpipe_frag": lambda: Qpipe("qpipe_frag", form="frag"),
        "qpipe_w8": QpipeW8,
        "fp8": Fp8,
        "fp8_w8a8": lambda: Fp8("fp8_w8a8", gemv=False),
        "gemlite": lambda: Peer("gemlite", gemlite_autotune),
        "marlin": lambda: Peer("marlin"),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown --impls {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n]() for n in names]


# -- driver --------------------------------------------------------------------------------

# Issue 20's table (Qwen3-8B, Llama-3-70B, Qwen2.5-7B shapes) and issue 34's five
SHAPE_SETS = {
    "issue20": [(4096, 4096), (6144, 4096), (24576, 4096), (4096, 12288), (28672, 8192),
                (8192, 28672), (18944, 3584), (3584, 18944)],
    "issue34": [(14336, 4096), (4096, 14336), (6144, 4096), (27648, 5120), (5120, 13824)],
}  # fmt: skip
SHAPE_SETS["all"] = list(dict.fromkeys(SHAPE_SETS["issue20"] + SHAPE_SETS["issue34"]))

# Issue 34's targets: speed-up over fp16 cuBLAS by M (W4, and W8 at M = 1 and 16)
TARGETS_W4 = {1: 3.3, 4: 3.0, 16: 2.8, 64: 1.5}
W4_COLUMNS = ("qpipe", "qpipe_frag", "qpipe_v2")  # the forms a 4-bit QuantLinear may hold
TARGETS_W8 = {1: 1.8, 16: 1.6}
PEERS = ("tinygemm", "bnb_nf4", "gemlite", "marlin")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        if part in SHAPE_SETS:
            out += SHAPE_SETS[part]
        else:
            n, k = part.lower().split("x")
            out.append((int(n), int(k)))
    return list(dict.fromkeys(out))


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


def run(
    shapes,
    ms,
    impls: list[str],
    replays: int,
    log=print,
    budget_s: float | None = None,
    on_shape=None,
    gemlite_autotune: bool = False,
) -> tuple[dict, list[Result]]:
    """Every implementation at every shape and M; ``on_shape(env, results)`` after each shape
    (the caller writes the files: a call cut short keeps what it measured). Past ``budget_s``
    seconds no new shape starts."""
    from qpipe.kernels import quantize_rtn

    t_start = time.time()
    env = environment()
    l2 = env["l2_bytes"]
    env["copy_gbs"] = copy_bandwidth_gbs()
    log(f"# {env['device']}  copy bandwidth {env['copy_gbs']:.0f} GB/s")
    results: list[Result] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    env["skipped_shapes"] = []
    for n, k in shapes:
        if budget_s is not None and time.time() - t_start > budget_s:
            env["skipped_shapes"].append(f"{n}x{k}")
            log(f"# {n}x{k}: not started, past the {budget_s:.0f} s budget")
            continue
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
        iw = quantize_rtn(w, group_size=GROUP, symmetric=True, scale_dtype=torch.float16)
        w_deq = iw.dequantize().cuda()
        ready = {}
        for impl in implementations(impls, gemlite_autotune):
            t0 = time.time()
            try:
                impl.setup(w, iw, l2)
                ready[impl.name] = impl
            except Exception as e:  # a peer that cannot build/import: its cells say why
                ready[impl.name] = f"{type(e).__name__}: {e}"[:300]
                log(f"{n}x{k} {impl.name:<9} setup failed: {ready[impl.name]}")
            else:
                log(f"{n}x{k} {impl.name:<9} setup {time.time() - t0:.1f}s")
        for m in ms:
            x16 = torch.randn(m, k, device="cuda", generator=gen).half()
            xs = {"fp16": x16, "bf16": x16.bfloat16()}
            ref = x16.float() @ w_deq.t()
            for name in impls:
                t0 = time.time()
                state = ready[name]
                if isinstance(state, str):
                    r = Result((n, k), m, name, None, error=f"skipped: {state}")
                else:
                    try:
                        impl = state.bind(xs, ref)
                        err = impl.check() if impl.check else None
                        us = time_calls(impl.calls, replays)
                        r = Result((n, k), m, name, us, impl.bytes_per_call / (us * 1e-6) / 1e9)
                        r.rel_err = err
                        r.extra = {"note": impl.note, "copies": len(impl.calls)}
                        if getattr(impl, "config", None):
                            r.extra["config"] = impl.config()
                        del impl
                    except Exception as e:  # one broken implementation must not sink the table
                        r = Result((n, k), m, name, None, error=f"{type(e).__name__}: {e}"[:300])
                results.append(r)
                msg = f"{n}x{k} M={m:<3} {name:<9} "
                msg += f"{r.us:8.2f} us {r.gbs:7.0f} GB/s" if r.us else f"FAILED {r.error}"
                if r.rel_err is not None:
                    msg += f"  rel_err {r.rel_err:.1e}"
                if r.extra.get("config"):
                    msg += (
                        f"  {r.extra['config'].get('form', '')} {r.extra['config'].get('kind', '')}"
                    )
                log(msg + f"  ({time.time() - t0:.1f}s)")
        del ready, w, iw, w_deq
        torch.cuda.empty_cache()
        if on_shape:
            on_shape(env, results)
    try:
        import peers

        env["gemlite_configs"] = dict(peers.GEMLITE_CONFIG_SOURCES)
    except ImportError:
        pass
    return env, results


def _speedup(by, shape, m, impl) -> float | None:
    base, r = by.get((shape, m, "fp16")), by.get((shape, m, impl))
    return base.us / r.us if base and r and base.us and r.us else None


def targets(results: list[Result]) -> list[str]:
    """Issue 34's targets, each met or not, with the cells that miss."""
    by = {(r.shape, r.m, r.impl): r for r in results}
    shapes = list(dict.fromkeys(r.shape for r in results))
    lines = []
    w4 = [(i, TARGETS_W4) for i in W4_COLUMNS if any(r.impl == i for r in results)]
    for impl, goals in (*w4, ("qpipe_w8", TARGETS_W8)):
        for m, goal in goals.items():
            got = {s: _speedup(by, s, m, impl) for s in shapes}
            got = {s: v for s, v in got.items() if v is not None}
            if not got:
                continue
            miss = {s: v for s, v in got.items() if v < goal}
            status = "met" if not miss else f"not met on {len(miss)} of {len(got)} shapes"
            worst = min(got.values())
            lines.append(f"- {impl} M={m} >= {goal}x fp16: {status} (lowest {worst:.2f}x"
                         + (", misses: " + ", ".join(f"{s[0]}x{s[1]} {v:.2f}" for s, v in miss.items())
                            if miss else "") + ")")  # fmt: skip
    ms = sorted({r.m for r in results})
    for impl, _ in w4:
        beaten = []
        for s in shapes:
            for m in ms:
                mine = by.get((s, m, impl))
                if not (mine and mine.us):
                    continue
                for peer in PEERS:
                    other = by.get((s, m, peer))
                    if other and other.us and other.us < mine.us:
                        beaten.append(
                            f"{s[0]}x{s[1]} M={m} {peer} {other.us:.2f} < {mine.us:.2f} µs"
                        )
        lines.append(f"- {impl} at least as fast as every peer measured: "
                     + ("met" if not beaten else "not met: " + "; ".join(beaten)))  # fmt: skip
    return lines


def markdown(env: dict, results: list[Result], header: dict | None = None) -> str:
    import harness

    by = {(r.shape, r.m, r.impl): r for r in results}
    order = (
        "fp16", "tinygemm", "bnb_nf4", "qpipe", "qpipe_v2", "qpipe_frag", "qpipe_w8", "fp8",
        "fp8_w8a8", "gemlite", "marlin",
    )  # fmt: skip
    impls = [i for i in order if any(r.impl == i for r in results)]
    others = [i for i in impls if i != "fp16"]
    lines = harness.markdown_heading("W4A16 / W8A16 kernels", header) if header else []
    lines += [
        f"driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton "
        f"{env['triton']}, bitsandbytes {env['bitsandbytes']}; measured copy bandwidth "
        f"{env['copy_gbs']:.0f} GB/s (read + write).",
        "",
        "Times in µs per call (median of CUDA-graph replays over rotating weight copies that "
        "outrun the L2: weights come from HBM); `x` = speed-up over fp16 cuBLAS; GB/s = bytes "
        "the call must move / time; err = relative error against the fp32 product of the same "
        "quantized weights. Every 4-bit row holds the same symmetric int4 g128 integers and "
        "fp16 scales (symmetric because Marlin holds nothing else; tinygemm, GemLite and "
        "Marlin are fed exactly these; bnb nf4 quantizes the same fp16 weights its own way, "
        "blocksize 64, its error against its own dequantized weights); qpipe_w8: symmetric "
        "int8 g128; fp8: e4m3 per channel, bf16 activations, as Fp8Linear runs it: the FP8 GEMV "
        "(weight-only) at M <= 4, torch._scaled_mm with activations quantized per token above; "
        "fp8_w8a8: torch._scaled_mm at every M.",
        "",
        "| N x K | M | " + " | ".join(f"{i} µs" for i in impls) + " | "
        + " | ".join(f"{i} x" for i in others) + " | "
        + " | ".join(f"{i} GB/s" for i in impls) + " | "
        + " | ".join(f"{i} err" for i in others) + " |",
        "|" + "---|" * (2 + len(impls) + len(others) + len(impls) + len(others)),
    ]  # fmt: skip
    for shape in dict.fromkeys(r.shape for r in results):
        for m in dict.fromkeys(r.m for r in results if r.shape == shape):
            cells = []
            for i in impls:
                r = by.get((shape, m, i))
                cells.append(f"{r.us:.2f}" if r and r.us else "n/a")
            ratios = [f"{v:.2f}" if (v := _speedup(by, shape, m, i)) else "n/a" for i in others]
            gbs = [f"{r.gbs:.0f}" if (r := by.get((shape, m, i))) and r.gbs else "n/a"
                   for i in impls]  # fmt: skip
            errs = [f"{r.rel_err:.1e}" if (r := by.get((shape, m, i))) and r.rel_err is not None
                    else "n/a" for i in others]  # fmt: skip
            lines.append(f"| {shape[0]}x{shape[1]} | {m} | " + " | ".join(cells + ratios + gbs + errs)
                         + " |")  # fmt: skip
    goals = targets(results)
    if goals:
        lines += ["", "Issue 34's targets (this card):", *goals]
    configs = [r for r in results if r.extra.get("config")]
    if configs:
        lines += ["", "qpipe's tuned launch per shape and M: "
                  + "; ".join(f"{r.shape[0]}x{r.shape[1]} M={r.m} {r.impl} "
                              + " ".join(f"{k}={v}" for k, v in r.extra["config"].items())
                              for r in configs)]  # fmt: skip
    if env.get("gemlite_configs"):
        lines += ["", "GemLite launch configurations: "
                  + "; ".join(f"{k}: {v}" for k, v in env["gemlite_configs"].items())]  # fmt: skip
    if env.get("skipped_shapes"):
        lines += ["", "Not measured (past the time budget): " + ", ".join(env["skipped_shapes"])]
    errs = [r for r in results if r.error]
    if errs:
        lines += ["", "Failures and skips:"] + [f"- {r.impl} {r.shape} M={r.m}: {r.error}"
                                               for r in errs]  # fmt: skip
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


def merge(paths: list[Path], out: Path | None, tag: str) -> None:
    """One table from the result files of several calls (on one card): their rows in order,
    the first file's header and environment, every call's command kept."""
    import harness

    datas = [json.loads(Path(p).read_text()) for p in paths]
    header = {k: v for k, v in datas[0].items() if k not in ("env", "results")}
    header["command"] = " && ".join(d["command"] for d in datas)
    env = dict(datas[0]["env"])
    for d in datas[1:]:
        env.setdefault("gemlite_configs", {}).update(d["env"].get("gemlite_configs") or {})
        env["skipped_shapes"] = env.get("skipped_shapes", []) + d["env"].get("skipped_shapes", [])
    results = []
    for d in datas:
        for r in d["results"]:
            r = dict(r)
            r["shape"] = tuple(r["shape"])
            results.append(Result(**r))
    cards = {d["device"]["name"] for d in datas}
    if len(cards) > 1:
        sys.exit(f"--merge: the files come from different cards ({', '.join(sorted(cards))})")
    stem = f"kernels_{harness.card_slug(header['device'])}" + (f"_{tag}" if tag else "")
    md = markdown(env, results, header)
    if out:
        harness.write_result(stem, {**header, "env": env, "results": [r.__dict__ for r in results]},
                             md, out)  # fmt: skip
    print(md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for kernels_<card>[_<tag>].json/.md (default: $OUT or none)")  # fmt: skip
    ap.add_argument("--tag", default="", help="file name suffix: kernels_<card>_<tag>")
    ap.add_argument("--impls", default="fp16,tinygemm,bnb_nf4,qpipe,qpipe_w8,gemlite,marlin",
                    help="fp16,tinygemm,bnb_nf4,qpipe,qpipe_v2,qpipe_w8,fp8,fp8_w8a8,"
                    "gemlite,marlin")  # fmt: skip
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                    help="NxK,... or a set: " + ", ".join(SHAPE_SETS))  # fmt: skip
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new shape after this many seconds (the files keep the rest)")  # fmt: skip
    ap.add_argument("--gemlite-autotune", action="store_true",
                    help="let GemLite autotune shapes it has no H100 config for (slow)")  # fmt: skip
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="kernels_*.json of several calls -> one table (kernels_<card>[_<tag>])")  # fmt: skip
    ap.add_argument("--sweep", action="store_true", help="time explicit kernel configs")
    ap.add_argument("--sweep-w8", action="store_true", help="time explicit W8A16 configs")
    ap.add_argument("--layouts", default="rows", help="--sweep: rows,tiled (layout.tile_w4)")
    ap.add_argument("--kinds", default="", help="--sweep: only these kernel kinds (gemv,mm,mmp)")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out, args.tag)
        return
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA device")
    shapes = parse_shapes(args.shapes)
    ms = [int(v) for v in args.ms.split(",")]
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if args.sweep_w8:
        rows = sweep_w8(shapes, ms, args.replays)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"sweep_w8_{args.tag or 'gpu'}.json").write_text(json.dumps(rows))
        return
    if args.sweep:
        layouts = tuple(args.layouts.split(","))
        kinds = tuple(k for k in args.kinds.split(",") if k)
        rows = sweep(shapes, ms, args.replays, layouts=layouts, kinds=kinds)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"sweep_{args.tag or 'gpu'}.json").write_text(json.dumps(rows))
        return
    import harness

    header = harness.result_header("python bench/kernel_bench.py " + shlex.join(sys.argv[1:]))
    stem = f"kernels_{harness.card_slug(header['device'])}" + (f"_{args.tag}" if args.tag else "")

    def write(env, results):
        if out is None:
            return
        data = {**header, "env": env, "results": [r.__dict__ for r in results]}
        harness.write_result(stem, data, markdown(env, results, header), out)

    env, results = run(
        shapes, ms, args.impls.split(","), args.replays, budget_s=args.budget_s,
        on_shape=write, gemlite_autotune=args.gemlite_autotune,
    )  # fmt: skip
    write(env, results)
    print(markdown(env, results, header))


if __name__ == "__main__":
    main()
