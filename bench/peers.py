"""Other W4A16 kernels beside qpipe's in the kernel bench, fed the same integers.

* **GemLite** (PyPI ``gemlite``, Triton): ``GemLiteLinear(4, group_size=128)`` packed from our
  ``IntWeights`` (``W_q`` = the same int4 values, the same fp16 scales, the integer zero 8 of a
  symmetric scheme: GemLite dequantizes ``(W_q - 8) * s``, exactly our weights). GemLite ships
  launch configurations tuned on an H100 (``gemlite/configs/h100.json``) and autotunes shapes it
  has none for; a bench call cannot afford an autotune per shape, so a shape it lacks gets the
  H100 configuration of the nearest cached shape of the same kernel kind (``gemlite_configs``
  says which; ``--gemlite-autotune`` lets GemLite tune instead).
* **Marlin** (github IST-DASLab/marlin, CUDA): built on the GPU machine at bench time with
  ``torch.utils.cpp_extension.load`` from its public source (never part of this repository:
  ``--marlin-src``, default ``<repo>/.peers/marlin``), for the card's own architecture.
  Marlin holds symmetric int4 only (group 128 or per channel): ``Layer.pack`` is handed our
  dequantized weights and scales and recovers the same integers (``round(w / s) + 8``; the fp16
  weight ``(q - 8) * s`` is within half a step of the integer, so the rounding is exact).

A peer that cannot be built or imported is skipped with its reason, once per process.
"""

from __future__ import annotations

import ast
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GROUP = 128

_UNAVAILABLE: dict[str, str] = {}  # peer -> why it cannot run in this process


class PeerUnavailable(RuntimeError):
    """The peer cannot be built or imported here (the bench skips its column)."""


def unavailable(name: str) -> str | None:
    return _UNAVAILABLE.get(name)


def _fail(name: str, why: str) -> PeerUnavailable:
    _UNAVAILABLE[name] = why
    return PeerUnavailable(why)


# -- GemLite ----------------------------------------------------------------------------------


GEMLITE_CONFIG_SOURCES: dict[str, str] = {}  # "(M, N, K)" -> where its launch config came from


def _gemlite():
    if "gemlite" in _UNAVAILABLE:
        raise PeerUnavailable(_UNAVAILABLE["gemlite"])
    try:
        import gemlite  # noqa: F401
        from gemlite import core
    except Exception as err:  # noqa: BLE001 (not installed, or fails to import on this stack)
        raise _fail("gemlite", f"gemlite does not import: {type(err).__name__}: {err}") from err
    if not core.GEMLITE_TRITON_CONFIG_CACHE:  # a card it has no file for: its H100 configs
        path = Path(core.__file__).parent / "configs" / "h100.json"
        core.GemLiteLinear.load_config(str(path))
    return core


def _log_distance(a: tuple, b: tuple) -> float:
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b, strict=True))


def gemlite_config_for(m: int, n: int, k: int, autotune: bool = False) -> str:
    """Make sure GemLite finds a launch configuration for this call without autotuning: its
    own cached one, else the nearest cached shape's of the same kernel kind. Returns where the
    configuration comes from (for the result file)."""
    core = _gemlite()
    from gemlite.triton_kernels.utils import get_closest_m

    kind = core.get_matmul_type(m, 4)
    type_id = core.DType.FP16.value * 100 + 4
    key = (get_closest_m(m), n, k, GROUP, 8, type_id)  # 8 int4 per int32 word
    cache = core.GEMLITE_TRITON_CONFIG_CACHE.setdefault(kind, {})
    if str(key) in cache:
        source = f"{kind}: GemLite's cached config"
    elif autotune:
        source = f"{kind}: autotuned by GemLite"
    else:
        same = [ast.literal_eval(s) for s in cache]
        same = [s for s in same if tuple(s[3:]) == key[3:]]
        if not same:
            source = f"{kind}: no cached config of this kind: autotuned by GemLite"
        else:
            near = min(same, key=lambda s: _log_distance(s[:3], key[:3]))
            cache[str(key)] = dict(cache[str(near)])
            source = f"{kind}: cached config of {near[0]}x{near[1]}x{near[2]} (nearest)"
    GEMLITE_CONFIG_SOURCES[f"{m}x{n}x{k}"] = source
    return source


def make_gemlite(iw, x: torch.Tensor, copies: int, ref: torch.Tensor, autotune: bool = False):
    """(calls, bytes per call, note, check) of GemLite A16W4 g128 on ``iw``'s integers."""
    core = _gemlite()
    n, k = iw.shape
    if iw.zeros is not None or iw.g_idx is not None or iw.group_size != GROUP:
        raise ValueError("the GemLite rows take symmetric g128 weights without act-order")
    m = x.shape[0]
    source = gemlite_config_for(m, n, k, autotune)
    q = iw.q.to(device=x.device, dtype=torch.uint8).contiguous()
    s = iw.scales.to(device=x.device, dtype=torch.float16).contiguous()
    layers = []
    for _ in range(copies):
        layer = core.GemLiteLinear(
            4, group_size=GROUP, in_features=k, out_features=n,
            input_dtype=core.DType.FP16, output_dtype=core.DType.FP16,
        )  # fmt: skip
        layers.append(layer.pack(q, s, 8, None))  # W = (W_q - 8) * s: our weights exactly
    first = layers[0]
    nbytes = (
        first.W_q.numel() * first.W_q.element_size()
        + first.scales.numel() * first.scales.element_size()
        + x.numel() * 2
        + m * n * 2
    )
    calls = [lambda layer_=layer_: layer_(x) for layer_ in layers]
    note = f"gemlite {_version('gemlite')} GemLiteLinear A16W4 g128, zero 8; {source}"
    return calls, nbytes, note, lambda: _rel_err(calls[0](), ref)


# -- Marlin -----------------------------------------------------------------------------------


def marlin_src(default: Path | None = None) -> Path:
    return Path(os.environ.get("QPIPE_MARLIN_SRC") or default or ROOT / ".peers" / "marlin")


def build_marlin(src: Path | None = None, build_dir: Path | None = None, log=print):
    """Marlin's Python module, its CUDA extension built here (once per process; ninja reuses
    an earlier build in ``build_dir``)."""
    if "marlin" in _UNAVAILABLE:
        raise PeerUnavailable(_UNAVAILABLE["marlin"])
    if "marlin" in sys.modules:
        return sys.modules["marlin"]
    src = marlin_src(src)
    kernel = src / "marlin" / "marlin_cuda_kernel.cu"
    if not kernel.is_file():
        raise _fail("marlin", f"no Marlin source at {src} (bring IST-DASLab/marlin there)")
    if not torch.cuda.is_available():
        raise _fail("marlin", "Marlin needs a CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise _fail(
            "marlin", f"Marlin needs compute capability 8.0+, this card has {major}.{minor}"
        )
    build_dir = Path(build_dir or os.environ.get("QPIPE_MARLIN_BUILD", "/tmp/qpipe_marlin_build"))
    build_dir.mkdir(parents=True, exist_ok=True)
    arch = f"{major}{minor}"
    t0 = time.time()
    try:
        from torch.utils.cpp_extension import load

        ext = load(
            name="marlin_cuda",
            sources=[str(src / "marlin" / "marlin_cuda.cpp"), str(kernel)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 (no nvcc, a compiler error, ...)
        why = f"Marlin did not build: {type(err).__name__}: {str(err)[-400:]}"
        raise _fail("marlin", why) from err
    sys.modules["marlin_cuda"] = ext  # marlin/__init__.py imports it by this name
    sys.path.insert(0, str(src))
    try:
        import marlin
    except Exception as err:  # noqa: BLE001
        raise _fail("marlin", f"marlin does not import: {type(err).__name__}: {err}") from err
    log(f"# marlin built for sm_{arch} in {time.time() - t0:.0f} s ({build_dir})")
    return marlin


def marlin_layers(iw, copies: int, device: torch.device) -> list:
    """``copies`` Marlin layers holding ``iw``'s (symmetric g128) integers, packed once."""
    marlin = build_marlin()
    n, k = iw.shape
    if iw.zeros is not None or iw.g_idx is not None or iw.group_size != GROUP:
        raise ValueError("Marlin takes symmetric g128 weights without act-order")
    if n % 256 or k % 128:
        raise ValueError(f"Marlin needs N % 256 == 0 and K % 128 == 0, got {n}x{k}")
    scales = iw.scales.to(device=device, dtype=torch.float16)  # [N, G]
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.float16, device=device)
    with torch.no_grad():  # (q - 8) * s in fp16: Layer.pack rounds w / s back to q - 8
        linear.weight.copy_(iw.dequantize(torch.float32).to(device).half())
    first = marlin.Layer(k, n, groupsize=GROUP).to(device)
    first.pack(linear, scales)
    del linear
    layers = [first]
    for _ in range(copies - 1):  # packing is slow (numpy): copy the packed tensors
        layer = marlin.Layer(k, n, groupsize=GROUP).to(device)
        layer.B.copy_(first.B)
        layer.s.copy_(first.s)
        layers.append(layer)
    return layers


def marlin_calls(layers: list, x: torch.Tensor, ref: torch.Tensor):
    """(calls, bytes per call, note, check) of Marlin layers on activations ``x``."""
    first = layers[0]
    m, n = x.shape[0], first.s.shape[1]
    nbytes = first.B.numel() * 4 + first.s.numel() * 2 + x.numel() * 2 + m * n * 2
    calls = [lambda layer_=layer_: layer_(x) for layer_ in layers]
    note = "Marlin (IST-DASLab, built here) Layer, sym int4 g128, fp16"
    return calls, nbytes, note, lambda: _rel_err(calls[0](), ref)


# -- helpers ----------------------------------------------------------------------------------


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":  # python bench/peers.py: build Marlin ahead (a GPU call's background)
    try:
        build_marlin()
    except PeerUnavailable as err:
        sys.exit(f"marlin: {err}")
