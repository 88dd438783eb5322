"""bitsandbytes 4-bit on CPUs with AVX512-BF16: layers its repacking kernel cannot take run on
its generic path (qpipe.backends.bnb.keep_cpu_repack_to_supported_widths)."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from qpipe.backends.bnb import keep_cpu_repack_to_supported_widths


def _layer(k: int, n: int) -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(k + n))
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to("cpu").eval()  # quantizes, as a model load does


def test_only_supported_shapes_keep_the_avx512_repack() -> None:
    model = torch.nn.ModuleDict(
        {"ok": _layer(256, 256), "n688": _layer(256, 688), "k688": _layer(688, 256)}
    )
    for layer in model.values():
        layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    assert keep_cpu_repack_to_supported_widths(model) == 2
    assert model["ok"].support_avx512bf16_for_cpu
    assert not model["n688"].support_avx512bf16_for_cpu
    assert not model["k688"].support_avx512bf16_for_cpu


def test_every_shape_runs_forward_on_this_cpu() -> None:
    # On a CPU with AVX512-BF16 the unswitched 688-wide layers fail here (bitsandbytes 0.50).
    model = torch.nn.ModuleDict({"n688": _layer(256, 688), "k688": _layer(688, 256)})
    keep_cpu_repack_to_supported_widths(model)
    with torch.inference_mode():
        assert model["n688"](torch.randn(2, 256)).shape == (2, 688)
        assert model["k688"](torch.randn(2, 688)).shape == (2, 256)
