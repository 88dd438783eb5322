"""Converters: checkpoint tensors built by independent reference packers must unpack exactly."""

from __future__ import annotations

import pytest
import torch

from qpipe.kernels import (
    IntWeights,
    from_autoawq,
    from_autogptq,
    from_compressed_tensors,
    pack_w4,
    quantize_rtn,
    unpack_w4,
)
from tests.format_packers import pack_autoawq, pack_autogptq, pack_compressed_tensors


def _random_int(n: int, k: int, gs: int, *, seed: int, zlo: int = 0, act_order: bool = False):
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // gs)
    q = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(zlo, 16, (n, g), generator=gen)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).half().float()
    g_idx = None
    if act_order:
        # GPTQ act-order: columns quantized in a permuted order, groups filled in that order.
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    return q, zeros, scales, g_idx


def _expected(q, zeros, scales, g_idx, gs):
    grp = g_idx.long() if g_idx is not None else torch.arange(q.shape[1]) // gs
    return (q.float() - zeros.float()[:, grp]) * scales[:, grp]


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_autogptq_asym_exact(gs, act_order, fmt):
    n, k = 40, 256
    # v1 cannot represent a zero of 0 (see the next test): keep zeros >= 1 for the round trip.
    q, zeros, scales, g_idx = _random_int(n, k, gs, seed=gs, zlo=1, act_order=act_order)
    t = pack_autogptq(q, zeros, scales, g_idx, sym=False, checkpoint_format=fmt, group_size=gs)
    assert t["qweight"].shape == (k // 8, n) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (k // gs, n // 8) and t["scales"].shape == (k // gs, n)
    iw = from_autogptq(**t, bits=4, sym=False, zeros_minus_one=fmt == "gptq")
    assert iw.group_size == gs
    assert torch.equal(iw.q.long(), q)
    assert torch.equal(iw.zeros.long(), zeros)
    assert (iw.g_idx is None) == (not act_order)
    assert torch.equal(iw.dequantize(), _expected(q, zeros, scales, g_idx, gs))


def test_autogptq_v1_zero_of_zero_reads_as_sixteen():
    """v1 stores zero - 1; a zero of 0 wraps to 15 and AutoGPTQ's kernels add 1 back: 16."""
    n, k, gs = 16, 64, 32
    q, zeros, scales, _ = _random_int(n, k, gs, seed=3)
    zeros[0, 0], zeros[5, 1] = 0, 0
    t = pack_autogptq(q, zeros, scales, None, sym=False, group_size=gs)
    iw = from_autogptq(**t, sym=False)
    expect = zeros.clone()
    expect[zeros == 0] = 16
    assert torch.equal(iw.zeros.long(), expect)
    # and the qpipe layout keeps the 16 (uint8) exactly
    assert torch.equal(unpack_w4(pack_w4(iw, torch.float32)).dequantize(), iw.dequantize())


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_autogptq_sym(fmt):
    n, k, gs = 24, 576, 64
    q, _, scales, _ = _random_int(n, k, gs, seed=5)
    t = pack_autogptq(q, None, scales, None, sym=True, checkpoint_format=fmt, group_size=gs)
    iw = from_autogptq(**t, sym=True, zeros_minus_one=fmt == "gptq")
    assert iw.zeros is None and iw.g_idx is None and iw.group_size == gs
    assert torch.equal(iw.dequantize(), _expected(q, torch.full_like(scales, 8), scales, None, gs))
    with pytest.raises(ValueError, match="checkpoint_format"):
        other = "gptq_v2" if fmt == "gptq" else "gptq"
        from_autogptq(**t, sym=True, zeros_minus_one=other == "gptq")


def test_autogptq_partial_last_group():
    """K=576 with group 128: five groups, the last one 64 columns wide."""
    n, k, gs = 16, 576, 128
    q, zeros, scales, _ = _random_int(n, k, gs, seed=9, zlo=1)
    assert scales.shape[1] == 5
    t = pack_autogptq(q, zeros, scales, None, sym=False, group_size=gs)
    t["g_idx"] = None  # group size must then be inferred from K and G alone
    iw = from_autogptq(**t, sym=False)
    assert iw.group_size == gs
    assert torch.equal(iw.dequantize(), _expected(q, zeros, scales, None, gs))


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_autoawq_exact(gs):
    n, k = 32, 256
    q, zeros, scales, _ = _random_int(n, k, gs, seed=11 + gs)
    t = pack_autoawq(q, zeros, scales)
    assert t["qweight"].shape == (k, n // 8) and t["qzeros"].shape == (k // gs, n // 8)
    iw = from_autoawq(**t, group_size=gs)
    assert torch.equal(iw.q.long(), q) and torch.equal(iw.zeros.long(), zeros)
    assert torch.equal(iw.dequantize(), _expected(q, zeros, scales, None, gs))


def test_autoawq_order_is_interleaved():
    """One word with columns 0..7 holding 0..7 must read [0,2,4,6,1,3,5,7] nibble by nibble."""
    q = torch.arange(8).view(1, 8).repeat(8, 1).t().contiguous()  # [N=8, K=8]: q[n, k] = n
    t = pack_autoawq(q, torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1))
    word = int(t["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_packer_matches_library(gs, symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k = 24, 576 if gs != 128 else 512
    q, zeros, scales, _ = _random_int(n, k, gs, seed=gs + symmetric)
    t = pack_compressed_tensors(q, zeros, scales, symmetric=symmetric)
    lib = pack_to_int32((q - 8).to(torch.int8), 4)
    assert torch.equal(t["weight_packed"], lib)
    if not symmetric:
        assert torch.equal(
            t["weight_zero_point"], pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0)
        )


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_matches_library_decompress(gs, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    n, k = 40, 512
    q, zeros, scales, _ = _random_int(n, k, gs, seed=21 + gs)
    if symmetric:
        zeros = torch.full_like(zeros, 8)
    t = pack_compressed_tensors(q, zeros, scales, symmetric=symmetric)
    iw = from_compressed_tensors(**t, group_size=gs, symmetric=symmetric)
    assert torch.equal(iw.dequantize(), _expected(q, zeros, scales, None, gs))
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=gs)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    lib = PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    assert torch.equal(iw.dequantize(), lib.float())


def test_compressed_tensors_unpacked_zero_point_and_g_idx():
    n, k, gs = 16, 128, 32
    q, zeros, scales, g_idx = _random_int(n, k, gs, seed=2, act_order=True)
    t = pack_compressed_tensors(q, zeros, scales, g_idx, symmetric=False)
    iw = from_compressed_tensors(**t, group_size=gs, symmetric=False)
    assert torch.equal(iw.dequantize(), _expected(q, zeros, scales, g_idx, gs))
    # in-memory (not yet compressed) zero points are signed int8 [N, G]
    t["weight_zero_point"] = (zeros - 8).to(torch.int8)
    iw2 = from_compressed_tensors(**t, group_size=gs, symmetric=False)
    assert torch.equal(iw2.dequantize(), iw.dequantize())
    # an unused g_idx (all -1) means no act-order
    t["weight_g_idx"] = torch.full((k,), -1, dtype=torch.int32)
    assert from_compressed_tensors(**t, group_size=gs, symmetric=False).g_idx is None


@pytest.mark.parametrize("bits", [3, 8])
def test_compressed_tensors_other_bit_widths(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k, gs = 8, 96, 32
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = torch.rand(n, k // gs, generator=gen)
    t = pack_compressed_tensors(q, None, scales, bits=bits)
    assert torch.equal(
        t["weight_packed"], pack_to_int32((q - 2 ** (bits - 1)).to(torch.int8), bits)
    )
    iw = from_compressed_tensors(**t, group_size=gs, bits=bits)
    assert torch.equal(iw.q.long(), q)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gs", [32, 128])
def test_rtn_matches_compressed_tensors(symmetric, gs):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = 32, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(gs))
    iw = quantize_rtn(w, group_size=gs, symmetric=symmetric, scale_dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=gs)
    wg = w.view(n, k // gs, gs)
    s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    ref = fake_quantize(w, s, z if not symmetric else None, args)
    assert torch.allclose(iw.scales, s)
    assert torch.equal(iw.dequantize(), ref)
    assert int(iw.q.max()) <= 15


def test_rtn_short_last_group_and_error():
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    iw = quantize_rtn(w, group_size=64, symmetric=False, scale_dtype=torch.float32)
    assert iw.scales.shape == (8, 2)
    err = (iw.dequantize() - w).abs().max(dim=1).values
    # round-to-nearest: at most half a step (plus float slack) from the original
    assert bool((err <= iw.scales.max(dim=1).values * 0.5 + 1e-6).all())


def test_kernel_layout_roundtrip_act_order():
    n, k, gs = 16, 192, 64
    q, zeros, scales, g_idx = _random_int(n, k, gs, seed=4, act_order=True)
    iw = IntWeights(q=q.to(torch.uint8), scales=scales, zeros=zeros, group_size=gs, g_idx=g_idx)
    back = unpack_w4(pack_w4(iw, torch.float32))
    assert torch.equal(back.dequantize(), iw.dequantize())
    assert torch.equal(back.g_idx, g_idx)


def test_kernel_layout_bit_order():
    """The kernels hard-code where each column sits inside a word: pin it."""
    from qpipe.kernels.layout import pack_int4_rows

    q = torch.arange(8, dtype=torch.uint8).view(1, 8)  # column c holds value c
    word = int(pack_int4_rows(q)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    # K not a multiple of 8: the tail word is zero-padded
    assert pack_int4_rows(torch.full((2, 9), 15, dtype=torch.uint8)).shape == (2, 2)
