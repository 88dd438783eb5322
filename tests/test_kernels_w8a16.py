"""The Triton W8A16 kernel (``Int8Linear``'s 8-bit weights) against the torch reference.

On CPU the kernel runs in Triton's interpreter, in a child process (TRITON_INTERPRET must be
set before triton is imported): this file re-executes itself and prints one JSON line per case.
The GPU test runs the compiled kernel through ``Int8Linear`` and skips without CUDA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# (name, M, N, K, group, symmetric, bias, config (block_m, block_n, block_k, split) or None)
# Odd on purpose: N not a multiple of the tile, M past one MMA block, a split that leaves the
# last split short of tiles.
CASES = [
    ("m1_g32_sym_bias", 1, 40, 256, 32, True, True, None),  # the heuristic: the GEMV
    ("m3_g64_asym_split3", 3, 24, 384, 64, False, False, (16, 16, 64, 3)),
    ("m17_g128_asym_bias", 17, 40, 256, 128, False, True, (16, 32, 64, 2)),
    ("m2_k576_partial_group", 2, 24, 576, 128, False, False, (16, 16, 128, 2)),
    # the GEMV (M <= 4): (_, block_n, block_k, split, warps, stages, "gemv")
    ("gemv_m1_asym_split3", 1, 40, 384, 64, False, True, (1, 16, 64, 3, 4, 1, "gemv")),
    ("gemv_m2_sym_k576", 2, 24, 576, 128, True, False, (1, 16, 128, 2, 4, 1, "gemv")),
    ("gemv_m3_asym_bias", 3, 40, 256, 128, False, True, (1, 32, 128, 1, 4, 1, "gemv")),
    ("gemv_m4_g32_split2", 4, 24, 256, 32, False, False, (1, 16, 32, 2, 4, 1, "gemv")),
]


def _case(m: int, n: int, k: int, gs: int, sym: bool, bias: bool, seed: int):
    from qpipe.kernels.int8_linear import Int8Linear
    from qpipe.kernels.intweights import IntWeights

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    groups = -(-k // gs)
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    zeros = None if sym else torch.randint(0, 256, (n, groups), generator=g).to(torch.uint8)
    iw = IntWeights(q=q, scales=scales, zeros=zeros, group_size=gs, g_idx=None, bits=8)
    b = torch.randn(n, generator=g) if bias else None
    layer = Int8Linear(iw, b, torch.float32, kernel="triton")
    x = torch.randn(m, k, generator=g)
    return layer, x


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    w = layer.dequantize(torch.float64)
    y = x.double() @ w.T
    return y if layer.bias is None else y + layer.bias.double()


def _run_interpreted_cases() -> None:
    from qpipe.kernels.triton_w8a16 import W8Config, w8a16_matmul

    for i, (name, m, n, k, gs, sym, bias, cfg) in enumerate(CASES):
        layer, x = _case(m, n, k, gs, sym, bias, seed=i)
        ref = _reference(layer, x)
        conf = None if cfg is None else W8Config(*cfg)
        y = w8a16_matmul(x, layer.qweight, layer.scales, layer.zeros, gs, layer.bias, conf)
        via_module = layer(x.unsqueeze(0)).squeeze(0)  # the module's own path, batched shape
        rel = float((y.double() - ref).norm() / ref.norm())
        rel_module = float((via_module.double() - ref).norm() / ref.norm())
        print(json.dumps({"name": name, "rel": rel, "rel_module": rel_module}), flush=True)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    from tests.conftest import run_interpreted  # here: the GPU run needs no Hydra (--noconftest)

    out = run_interpreted(__file__, "--interpreted-cases")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_interpreted_w8_kernel_matches_reference(interpreted_results, case: str) -> None:
    r = interpreted_results[case]
    # fp32 operands under the interpreter: only summation order differs from float64
    assert r["rel"] < 1e-5, r
    assert r["rel_module"] < 1e-5, r


def test_reference_is_kept_for_act_order_and_odd_group_sizes() -> None:
    from qpipe.kernels.int8_linear import Int8Linear
    from qpipe.kernels.intweights import IntWeights

    q = torch.zeros(8, 96, dtype=torch.uint8)
    s = torch.ones(8, 2)
    ragged = IntWeights(q=q, scales=s, zeros=None, group_size=64, g_idx=None, bits=8)
    assert Int8Linear(ragged, None, torch.float32).kernel == "triton"  # a partial last group
    g_idx = torch.arange(96) % 2
    act = IntWeights(q=q, scales=s, zeros=None, group_size=48, g_idx=g_idx, bits=8)
    assert Int8Linear(act, None, torch.float32).kernel == "torch"
    odd = IntWeights(q=q, scales=s[:, :1].repeat(1, 3), zeros=None, group_size=40, g_idx=None,
                     bits=8)  # fmt: skip
    assert Int8Linear(odd, None, torch.float32).kernel == "torch"  # 40: no K tile divides it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_gpu_w8_every_candidate_matches_reference(dtype: torch.dtype, m: int) -> None:
    """Every configuration the tuner may pick (GEMV and tensor cores, every split)."""
    from qpipe.kernels.triton_w8a16 import candidates, launch
    from qpipe.kernels.workspace import WORKSPACE

    layer, x = _case(m, 1000, 2048, 128, False, True, seed=10 + m)
    layer = layer.to("cuda", dtype)
    x = x.to("cuda", dtype) * 3.0  # activations beyond fp16's comfortable range for a dot
    ref = _reference(layer, x)
    tol = 2e-3 if dtype == torch.float16 else 8e-3
    cands = candidates(m, 1000, 2048, 128, x.device)
    assert any(c.kind == "gemv" for c in cands) == (m <= 4)
    for cfg in cands:
        y = launch(x, layer.qweight, layer.scales, layer.zeros, 128, layer.bias, cfg)
        rel = float((y.double() - ref).norm() / ref.norm())
        assert bool(torch.isfinite(y).all()) and rel < tol, (cfg, rel)
    _, cnt = WORKSPACE._bufs[x.device]
    assert bool((cnt == 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 16, 33])
def test_gpu_w8_kernel_matches_reference(dtype: torch.dtype, m: int) -> None:
    layer, x = _case(m, 1000, 2048, 128, False, True, seed=m)
    layer = layer.to("cuda", dtype)
    x = x.to("cuda", dtype)
    ref = _reference(layer, x)
    y = layer(x)
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < (2e-3 if dtype == torch.float16 else 8e-3), rel


if __name__ == "__main__" and "--interpreted-cases" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _run_interpreted_cases()
