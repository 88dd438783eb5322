"""2-, 3- and 8-bit GPTQ/RTN: compressed-tensors' packing, checkpoints that run on the torch
reference (IntLinear) with the weights transformers decompresses, and kernel labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from omegaconf import OmegaConf

from qpipe.backends import QuantizeRequest, get_backend
from qpipe.config.compose import load_group
from qpipe.kernels.formats import _unpack_dense
from qpipe.kernels.int_linear import IntLinear, pack_dense
from qpipe.kernels.intweights import IntWeights
from tests.conftest import save_random_llama


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_dense_is_compressed_tensors_packing(bits: int) -> None:
    q = torch.randint(0, 2**bits, (6, 100), generator=torch.Generator().manual_seed(bits))
    ours = pack_dense(q.to(torch.uint8), bits)
    # The library packs signed values (q - 2**(bits-1)) into the same unsigned view.
    theirs = pack_to_int32((q - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(_unpack_dense(ours, bits, 100), q)
    iw = IntWeights(q.to(torch.uint8), torch.ones(6, 1), None, group_size=100, bits=bits)
    assert torch.equal(IntLinear.from_int(iw, None)._unpack().to(torch.int64), q)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("small-llama"),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=256,
        tie_word_embeddings=False,
    )


def _quantize(folder: Path, out: Path, method: str, bits: int):
    quant = {**OmegaConf.to_container(load_group("quant", method)), "bits": bits}
    backend = get_backend(method)
    assert backend.unavailable_reason(quant, "cpu") is None
    request = QuantizeRequest(
        source=folder,
        model_class="AutoModelForCausalLM",
        quant=quant,
        skip_modules=["lm_head"],
        targets=[],
        output_dir=out,
        device="cpu",
        dtype=torch.float32,
        calib_seq_len=32,
        calib_samples=2,
    )
    return backend, backend.quantize(request)


@pytest.mark.parametrize(("method", "bits"), [("rtn", 2), ("rtn", 3), ("rtn", 8), ("gptq", 3)])
def test_other_widths_run_on_the_torch_reference_as_transformers_does(
    method: str, bits: int, small_llama: Path, tmp_path: Path
) -> None:
    backend, result = _quantize(small_llama, tmp_path / "ckpt", method, bits)
    ours = backend.load(result.checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    plain = backend.load(result.checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "hf")
    layer = ours.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, IntLinear) and layer.bits == bits and layer.kernel == "torch"
    # Packed at its width: 256 columns x bits / 32 int32 words per row.
    assert tuple(layer.qweight.shape) == (128, 256 * bits // 32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    hf_weight = plain.get_submodule("model.layers.0.mlp.down_proj").weight
    torch.testing.assert_close(layer.dequantize(), hf_weight, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_auto_kernel_is_triton_on_gpu_for_the_widths_it_runs(method: str) -> None:
    """4- and 8-bit layers run on qpipe's Triton kernels (W4A16, W8A16) on a GPU; 2- and
    3-bit on the torch reference; everything on the CPU on the torch reference."""
    backend = get_backend(method)
    quant = OmegaConf.to_container(load_group("quant", method))
    for bits, gpu in ((4, "triton"), (8, "triton"), (3, "torch"), (2, "torch")):
        assert backend.resolve_kernel("auto", {**quant, "bits": bits}, "cuda") == gpu
        assert backend.resolve_kernel("auto", {**quant, "bits": bits}, "cpu") == "torch"
