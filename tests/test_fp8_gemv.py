"""The FP8 decode GEMV (``triton_fp8.py``, ``Fp8Linear`` at M <= 4) against the dequantized
reference ``x @ (W8 * s).T``.

Tolerance, and why: the GEMV is weight-only with fp32 products and sums, so with fp32
activations it differs from an fp64 reference only by fp32 rounding, bounded per output by
``(K + 8) * 2**-24 * (|x| @ |W8 * s|.T + |b|)`` (K terms summed in some order, each product
and the final scale rounded once). With fp16/bf16 activations the kernel computes exactly what
it computes for the same values in fp32 (it widens them at the load) and rounds once to the
output dtype, so that is checked as equality with the fp32 run rounded: bit-exact in fp16;
in bf16 within one bf16 step, because Triton's CPU interpreter truncates fp32 -> bf16 where
the GPU rounds to nearest (on the GPU the test asks for bit equality).

The CPU tests run the kernel in Triton's interpreter in a child process (TRITON_INTERPRET must
be set before triton is imported): this file re-executes itself and prints one JSON line per
case. The interpreter runs the same bit-level dequantization the GPU's PTX performs (the
kernel's ``USE_ASM=False`` branch), and every e4m3 code is decoded exactly. GPU tests
(``-m gpu``) skip without CUDA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

FP8 = torch.float8_e4m3fn
# (name, M, N, K, x dtype, bias, config (block_n, block_k, split_k, warps) or None: heuristic)
# Odd on purpose: N not a multiple of the tile, K not a multiple of the K tile, a split whose
# last part is short of tiles.
CASES = [
    ("m1_fp32_bias_heuristic", 1, 40, 200, "float32", True, None),
    ("m2_fp32_split3_k_ragged", 2, 24, 452, "float32", False, (16, 64, 3, 4)),
    ("m3_fp16_bias_split2", 3, 40, 200, "float16", True, (16, 64, 2, 2)),
    ("m4_bf16_bias_nosplit", 4, 24, 136, "bfloat16", True, (32, 128, 1, 4)),
    ("m2_fp16_k100_heuristic", 2, 40, 100, "float16", False, None),
]


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows with a wide spread (each row's columns scaled over 2**-12..1, so the small
    ones round to e4m3 subnormals) and their fp32 scales, as ``quantize_per_channel`` makes."""
    from qpipe.kernels.fp8_linear import quantize_per_channel

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-12, 0, k, base=2.0)[torch.randperm(k)]
    q, s = quantize_per_channel(w)
    assert bool(((q.view(torch.uint8) & 0x78) == 0).any())  # subnormal codes present
    return q, s


def _bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[1]
    mag = x.double().abs() @ w.abs().T + (0 if b is None else b.double().abs())
    return (k + 8) * 2.0**-24 * mag


def _run_interpreted_cases() -> None:
    from qpipe.kernels.fp8_linear import Fp8Linear
    from qpipe.kernels.triton_fp8 import Fp8GemvConfig, e4m3_gemv

    for i, (name, m, n, k, dt, bias, cfg) in enumerate(CASES):
        dtype = getattr(torch, dt)
        q, s = _weights(n, k, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        b = (torch.randn(n, generator=g)).to(dtype) if bias else None
        conf = None if cfg is None else Fp8GemvConfig(*cfg)
        w = q.double() * s.double()[:, None]
        y = e4m3_gemv(x, q, s, b, conf)
        # the same values widened: the same fp32 sums, unrounded
        y32 = y if dtype == torch.float32 else e4m3_gemv(x.float(), q, s, b, conf)
        ref = x.double() @ w.T + (0 if b is None else b.double())
        over = float(((y32.double() - ref).abs() / _bound(x, w, b)).max())  # <= 1 passes
        if dtype == torch.float32:
            steps = 0.0
        else:  # how far y is from y32 rounded to its dtype, in steps of that dtype
            ulp = torch.finfo(dtype).eps * y32.abs().clamp_min(torch.finfo(dtype).tiny)
            steps = float(((y.float() - y32.to(dtype).float()).abs() / ulp).max())
        row = {"name": name, "dtype": dt, "over": over, "steps": steps}
        if conf is None:  # the module launches the heuristic configuration too
            layer = Fp8Linear(q, s, b, dtype, kernel="scaled_mm")
            row["module_equal"] = torch.equal(layer(x.reshape(1, m, k)).reshape(m, n), y)
            row["runs_on"] = layer.runs_on
            five = x.repeat(5, 1)[:5]  # five rows: past the GEMV, the weight-only matmul
            ref5 = five.double() @ w.T + (0 if b is None else b.double())
            err = (layer(five).double() - ref5).abs()
            ok = err <= torch.finfo(dtype).eps * ref5.abs() + _bound(five, w, b)
            row["five_rows_ok"] = bool(ok.all())
        print(json.dumps(row), flush=True)
    # compiled: Dynamo traces Fp8Linear's GEMV branch into the custom op, no graph break
    layer = Fp8Linear(*_weights(24, 64, seed=9), None, torch.float16, kernel="torch")
    x = torch.randn(1, 2, 64).half()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    print(json.dumps({"name": "compiled", "equal": torch.equal(compiled, layer(x))}), flush=True)
    # every finite e4m3 code decodes exactly: row r of W holds code r in every column, so
    # one-hot activations read the dequantized codes back with no rounding at all
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    w = codes[:, None].repeat(1, 16).view(FP8)
    x = torch.zeros(2, 16)
    x[0, 0], x[1, 5] = 1.0, 1.0
    y = e4m3_gemv(x, w, torch.ones(len(codes)), None, Fp8GemvConfig(16, 16, 1, 1))
    exact = torch.equal(y, w[:, 0].float().expand(2, -1))
    print(json.dumps({"name": "every_code", "exact": exact, "codes": len(codes)}), flush=True)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    from tests.conftest import run_interpreted  # here: the GPU run needs no Hydra (--noconftest)

    out = run_interpreted(__file__, "--interpreted-cases")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_interpreted_e4m3_gemv_matches_the_dequantized_reference(interpreted, case: str) -> None:
    r = interpreted[case]
    assert r["over"] <= 1.0, r  # within fp32 accumulation's bound of the fp64 reference
    # fp16: y is the fp32 result rounded once; bf16: within a step (the interpreter truncates)
    assert r["steps"] <= (1.0 if r["dtype"] == "bfloat16" else 0.0), r
    if "module_equal" in r:  # Fp8Linear at M <= 4: the GEMV, reported as such
        assert r["module_equal"] and r["runs_on"] == "e4m3_gemv+torch", r  # N = 40: unaligned
        assert r["five_rows_ok"], r


def test_interpreted_fp8_linear_compiles_to_the_gemv_op_without_a_graph_break(interpreted):
    assert interpreted["compiled"]["equal"]


def test_interpreted_e4m3_gemv_decodes_every_e4m3_code_exactly(interpreted) -> None:
    assert interpreted["every_code"] == {"name": "every_code", "exact": True, "codes": 254}


def test_layer_without_gemv_reports_its_kernel_and_refuses_bad_shapes() -> None:
    from qpipe.kernels.fp8_linear import Fp8Linear, quantize_per_channel
    from qpipe.kernels.triton_fp8 import e4m3_gemv, gemv_takes

    q, s = quantize_per_channel(torch.randn(32, 48))
    assert Fp8Linear(q, s, None, torch.float32).runs_on == "torch"  # CPU, no interpreter
    odd = Fp8Linear(*quantize_per_channel(torch.randn(8, 18)), None, torch.float32)
    assert not odd.gemv  # K = 18: no whole 4-byte words
    assert gemv_takes(4, 48) and not gemv_takes(5, 48) and not gemv_takes(1, 18)
    with pytest.raises(ValueError, match="1..4 rows"):
        e4m3_gemv(torch.randn(5, 48), q, s)
    with pytest.raises(ValueError, match="e4m3"):
        e4m3_gemv(torch.randn(1, 48), q.float(), s)


def _tuple(cfg) -> tuple:
    return (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps)


def test_candidates_hold_the_heuristic_first_and_split_within_sixteen_waves() -> None:
    from qpipe.kernels.triton_fp8 import candidates, heuristic
    from qpipe.kernels.tuning import _config_of

    cpu = torch.device("cpu")  # 132 SMs assumed: an H100's count
    for m, n, k in ((1, 4096, 4096), (4, 1024, 12288), (2, 152064, 4096)):
        cands = candidates(m, n, k, cpu)
        assert cands[0] == heuristic(m, n, k, cpu) and len(set(cands)) == len(cands)
        for c in cands:
            programs = -(-n // c.block_n) * c.split_k
            assert c.split_k == 1 or programs <= 16 * 132, (m, n, k, _tuple(c))
        assert _config_of(c.as_dict()) == c  # a stored choice reads back as an FP8 launch
    assert heuristic(1, 1024, 12288, cpu).split_k > 1  # a narrow layer splits K
    assert heuristic(1, 152064, 4096, cpu).split_k == 1  # a wide one has programs enough


# ---------------------------------------------------------------------------------------- GPU


def _gpu_case(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    q, s = _weights(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return q.cuda(), s.cuda(), x.cuda(), b.cuda()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("m", "dtype"),
    [(1, torch.float16), (2, torch.bfloat16), (3, torch.float16), (4, torch.bfloat16)],
)
def test_gpu_e4m3_gemv_every_candidate_matches_the_reference(m: int, dtype: torch.dtype) -> None:
    """Every configuration the tuner may pick: the fp32 run within fp32 accumulation's bound
    of the fp64 reference, and the fp16/bf16 run that result rounded once, bit for bit (one
    dtype per M: each (M, dtype, tile) pair is a compile)."""
    from qpipe.kernels.triton_fp8 import candidates, e4m3_gemv
    from qpipe.kernels.workspace import WORKSPACE

    n, k = 1000, 2048 + 96  # N not a multiple of any tile, K not a multiple of the K tile
    q, s, x, b = _gpu_case(m, n, k, dtype, seed=m)
    w = q.double() * s.double()[:, None]
    ref = x.double() @ w.T + b.double()
    for cfg in candidates(m, n, k, x.device):
        y32 = e4m3_gemv(x.float(), q, s, b, cfg)
        y = e4m3_gemv(x, q, s, b, cfg)
        over = float(((y32.double() - ref).abs() / _bound(x, w, b)).max())
        assert over <= 1.0, (_tuple(cfg), over)
        assert torch.equal(y, y32.to(dtype)), _tuple(cfg)
        assert torch.equal(e4m3_gemv(x, q, s, b, cfg), y), _tuple(cfg)  # deterministic
    _, cnt = WORKSPACE._bufs[x.device]
    assert bool((cnt == 0).all())  # every split-K ticket handed back


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_linear_decodes_on_the_gemv_in_graphs_and_compiled() -> None:
    """Fp8Linear at M <= 4 runs the GEMV (its name in the kernel qpipe logs), in a captured
    CUDA graph and under torch.compile (fullgraph, reduce-overhead) bit-identical to eager;
    above 4 rows the other kernel (W8A8 ``scaled_mm`` or weight-only) runs."""
    from qpipe.kernels import layer_kernels
    from qpipe.kernels.fp8_linear import Fp8Linear, fp8_tensor_cores

    kernel = "scaled_mm" if fp8_tensor_cores() else "torch"
    q, s, x, b = _gpu_case(4, 4096, 4096, torch.bfloat16, seed=7)
    layer = Fp8Linear(q, s, b, torch.bfloat16, kernel=kernel)
    model = torch.nn.Sequential(layer)
    assert layer_kernels(model) == [f"e4m3_gemv+{kernel}"]
    w = q.double() * s.double()[:, None]
    for m in (1, 2, 3, 4):
        xm = x[:m].reshape(m, 1, -1)  # decode: [batch, 1 token, K]
        got = layer(xm).reshape(m, -1)
        ref = x[:m].double() @ w.T + b.double()
        step = torch.finfo(torch.bfloat16).eps * ref.abs() + _bound(x[:m], w, b)
        assert bool(((got.double() - ref).abs() <= step).all()), m
    # above the GEMV: W8A8 quantizes the activations (about 2 % an element, less per dot)
    x16 = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    rel = float((layer(x16).double() - (x16.double() @ w.T + b.double())).norm() / (
        x16.double() @ w.T).norm())  # fmt: skip
    assert rel < 3e-2
    # a captured CUDA graph replays the GEMV with new inputs
    static = x[:1].clone()
    eager = layer(static)  # first call: tunes and sizes the workspace outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(static)
    static.copy_(x[1:2])
    graph.replay()
    assert torch.equal(captured, layer(x[1:2]))
    assert not torch.equal(captured, eager)
    # compiled decoding: the custom op, no graph break, CUDA graphs (reduce-overhead)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for m in (1, 4):
        xm = x[:m].reshape(m, 1, -1)
        for _ in range(3):  # warm-up, record, replay
            out = compiled(xm)
        assert torch.equal(out, layer(xm)), m


if __name__ == "__main__" and "--interpreted-cases" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _run_interpreted_cases()
