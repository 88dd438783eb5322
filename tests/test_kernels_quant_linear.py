"""QuantLinear on the torch path: drop-in behaviour, pad mode, act-order, save/load."""

from __future__ import annotations

import pytest
import torch

from qpipe.kernels import IntWeights, QuantLinear, kernel_available, quantize_rtn
from tests.format_packers import pack_autogptq


def _linear(k: int, n: int, seed: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("symmetric", [True, False])
def test_from_linear_matches_dequantized_reference(symmetric):
    lin = _linear(576, 72, seed=0)
    ql = QuantLinear.from_linear(lin, group_size=64, symmetric=symmetric, dtype=torch.float32)
    assert (ql.in_features, ql.out_features) == (576, 72)
    x = torch.randn(3, 5, 576)
    ref = x @ ql.dequantize().t() + lin.bias.detach()
    assert torch.allclose(ql(x), ref, atol=1e-5, rtol=1e-5)
    # and it is a quantization of the original layer, not something else
    rel = (ql.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.15


def test_pad_mode_is_exact():
    """K=576 padded to a multiple of 128: forward pads x with zeros, the result equals the
    unpadded quantized layer."""
    lin = _linear(576, 40, seed=1, bias=False)
    ql = QuantLinear.from_linear(lin, group_size=128, pad_to=128, dtype=torch.float32)
    assert ql.k_padded == 640 and ql.in_features == 576 and ql.scales.shape == (5, 40)
    w = ql.dequantize()
    assert w.shape == (40, 576)
    x = torch.randn(4, 576)
    assert torch.allclose(ql(x), x @ w.t(), atol=1e-5, rtol=1e-5)


def test_from_int_act_order_matches_int_weights():
    n, k, gs = 32, 256, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(1, 16, (n, k // gs), generator=gen)
    scales = torch.rand(n, k // gs, generator=gen) * 0.01
    perm = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    from qpipe.kernels import from_autogptq

    iw = from_autogptq(**pack_autogptq(q, zeros, scales, g_idx, sym=False), sym=False)
    ql = QuantLinear.from_int(iw, dtype=torch.float32)
    assert ql.act_order and ql.perm is not None
    w_ref = iw.dequantize()
    assert torch.equal(ql.dequantize(), w_ref)
    x = torch.randn(6, k)
    assert torch.allclose(ql(x), x @ w_ref.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_dtypes(dtype):
    lin = _linear(128, 48, seed=2)
    ql = QuantLinear.from_linear(lin, group_size=32, dtype=torch.float16)
    x = torch.randn(2, 128).to(dtype)
    y = ql(x)
    assert y.dtype == dtype and y.shape == (2, 48)
    ref = x.float() @ ql.dequantize().t() + ql.bias.float()
    assert torch.allclose(y.float(), ref, atol=5e-2, rtol=2e-2)


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    lin = _linear(200, 24, seed=3)
    ql = QuantLinear.from_linear(lin, group_size=32, symmetric=False, pad_to=64)
    path = tmp_path / "ql.safetensors"
    save_file(ql.state_dict(), str(path))
    fresh = QuantLinear.from_config(ql.config())
    fresh.load_state_dict(load_file(str(path)))
    x = torch.randn(3, 200)
    assert torch.equal(fresh(x), ql(x))
    assert set(ql.state_dict()) == {"qweight", "scales", "zeros", "bias"}


def test_held_forms_are_exact_and_read_layout_versions_1_and_2(tmp_path, monkeypatch):
    """Shapes with whole 16-row x 128-column tiles are held in the fragment order (layout v3,
    opt-in: QPIPE_FRAG=1), others row-major; v1 (row-major words) and v2 (1 KB tiles) state
    dicts load into a v3 module exactly; a module converted to tiles computes the same; fusing
    concatenates the fragment tiles."""
    monkeypatch.setenv("QPIPE_FRAG", "1")
    from qpipe.kernels.fusion import concat
    from qpipe.kernels.layout import frag_w4, tile_w4, untile_w4

    q = torch.randint(-(2**31), 2**31 - 1, (48, 32), dtype=torch.int64).to(torch.int32)
    assert torch.equal(untile_w4(tile_w4(q)), q) and not torch.equal(tile_w4(q).reshape(48, 32), q)
    lin = _linear(256, 48, seed=4)
    ql = QuantLinear.from_linear(lin, group_size=128, symmetric=False, dtype=torch.float32)
    assert ql.form == "frag" and tuple(ql.qweight.shape) == (3, 4, 128)
    assert ql.config()["layout_version"] == 3
    rows = QuantLinear.from_linear(_linear(256, 40, seed=4), group_size=128)  # N % 16 != 0
    assert rows.form == "rows" and tuple(rows.qweight.shape) == (40, 32)
    x = torch.randn(3, 256)
    assert torch.allclose(ql(x), x @ ql.dequantize().t() + lin.bias.detach(), atol=1e-5)
    words = ql.qweight_rows().clone()
    assert torch.equal(frag_w4(words), ql.qweight)
    for version, saved in ((1, words), (2, tile_w4(words))):  # as versions 1 and 2 saved it
        fresh = QuantLinear.from_config({**ql.config(), "layout_version": version})
        fresh.load_state_dict({**ql.state_dict(), "qweight": saved.clone()})
        assert torch.equal(fresh.qweight, ql.qweight) and torch.equal(fresh(x), ql(x))
    tiled = QuantLinear.from_config(ql.config())
    tiled.load_state_dict(ql.state_dict())
    tiled.convert_form("tiled")
    assert tiled.tiled and torch.equal(tiled(x), ql(x))
    back = QuantLinear.from_config(ql.config())  # a tiled module's state dict loads as v3
    back.load_state_dict(tiled.state_dict())
    assert torch.equal(back.qweight, ql.qweight)
    other = QuantLinear.from_linear(_linear(256, 32, seed=5), group_size=128, symmetric=False,
                                    dtype=torch.float32)  # fmt: skip
    fused = concat([ql, other])
    assert fused.form == "frag"
    assert torch.equal(fused(x), torch.cat([ql(x), other(x)], dim=-1))


def test_kernel_selection_errors():
    ql = QuantLinear.from_int(quantize_rtn(torch.randn(8, 64), group_size=32))
    with pytest.raises(ValueError, match="unknown kernel"):
        ql.kernel = "cuda"
    assert kernel_available("torch") is None
    assert "unknown kernel" in kernel_available("marlin")
    if not torch.cuda.is_available():
        assert "CUDA" in kernel_available("triton")
        ql.kernel = "triton"  # settable; running it on CPU fails with the reason
        with pytest.raises(Exception, match="CUDA"):
            ql(torch.randn(1, 64, dtype=torch.float16))


def test_int_weights_validation():
    with pytest.raises(ValueError):
        IntWeights(
            q=torch.zeros(4, 8, dtype=torch.uint8),
            scales=torch.ones(3, 1),
            zeros=None,
            group_size=8,
        )
    with pytest.raises(ValueError, match="4-bit"):
        QuantLinear.from_int(
            IntWeights(
                q=torch.zeros(4, 8, dtype=torch.uint8),
                scales=torch.ones(4, 1),
                zeros=None,
                group_size=8,
                bits=8,
            )
        )
