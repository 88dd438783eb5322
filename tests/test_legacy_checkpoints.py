"""AutoGPTQ and AutoAWQ checkpoints load into QuantLinear without those packages.

Checkpoints are written here from known integers by the reference packers of
``tests/format_packers.py`` (which share no code with qpipe's converters); the loaded weights
must dequantize to exactly the known values, and a whole tiny Llama must give the logits of a
plain model holding those dequantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from qpipe.backends import get_backend
from qpipe.backends.qlinear_loader import load_checkpoint
from qpipe.errors import ConfigError
from qpipe.kernels import QuantLinear
from tests.format_packers import pack_autoawq, pack_autogptq

GS = 64


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1024,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def known_ints(n: int, k: int, *, sym: bool, act_order: bool, seed: int) -> dict[str, Any]:
    """Random integers, fp16-exact scales, zeros in 1..15 and (act-order) a shuffled g_idx."""
    gen = torch.Generator().manual_seed(seed)
    g = k // GS
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).to(torch.float16).float()
    zeros = torch.full((n, g), 8) if sym else torch.randint(1, 16, (n, g), generator=gen)
    g_idx = None
    if act_order:  # desc_act: groups are formed in a permuted column order
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // GS).to(torch.int32)
    return {"q": q, "scales": scales, "zeros": zeros, "g_idx": g_idx}


def dequantize(ints: dict[str, Any]) -> torch.Tensor:
    k = ints["q"].shape[1]
    g = ints["g_idx"].long() if ints["g_idx"] is not None else torch.arange(k) // GS
    return (ints["q"].float() - ints["zeros"][:, g].float()) * ints["scales"][:, g]


def write_checkpoint(
    folder: Path, fmt: str, *, sym: bool = False, act_order: bool = False, **qcfg_extra: Any
) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A tiny Llama folder in AutoGPTQ ("gptq") or AutoAWQ ("awq") layout. Returns the exact
    dequantized weight of every packed module and the plain reference model."""
    config = tiny_llama_config()
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = {k: v.clone() for k, v in reference.state_dict().items()}
    targets = [
        n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    expected = {}
    for i, name in enumerate(targets):
        n, k = reference.get_submodule(name).weight.shape
        ints = known_ints(n, k, sym=sym, act_order=act_order, seed=i)
        if fmt == "gptq":
            packed = pack_autogptq(
                ints["q"], ints["zeros"], ints["scales"], ints["g_idx"], sym, group_size=GS
            )
        else:
            packed = pack_autoawq(ints["q"], ints["zeros"], ints["scales"])
        del tensors[f"{name}.weight"]
        tensors |= {f"{name}.{key}": value for key, value in packed.items()}
        expected[name] = dequantize(ints)
        reference.get_submodule(name).weight.data = expected[name].clone()
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if fmt == "gptq":
        qcfg = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GS,
            "desc_act": act_order,
            "sym": sym,
        }
    else:
        qcfg = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": GS,
            "zero_point": True,
            "version": "gemm",
        }
    qcfg |= qcfg_extra
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": qcfg}))
    return expected, reference


def _load(folder: Path, kernel: str = "torch") -> torch.nn.Module:
    return load_checkpoint(folder, "AutoModelForCausalLM", "cpu", torch.float32, kernel)


CASES = [
    pytest.param("gptq", True, False, id="autogptq-sym"),
    pytest.param("gptq", False, False, id="autogptq-asym"),
    pytest.param("gptq", False, True, id="autogptq-asym-desc_act"),
    pytest.param("gptq", True, True, id="autogptq-sym-desc_act"),
    pytest.param("awq", False, False, id="autoawq-gemm"),
]


@pytest.mark.parametrize(("fmt", "sym", "act_order"), CASES)
def test_legacy_checkpoint_dequantizes_exactly_and_gives_reference_logits(
    fmt: str, sym: bool, act_order: bool, tmp_path: Path
) -> None:
    expected, reference = write_checkpoint(tmp_path / fmt, fmt, sym=sym, act_order=act_order)
    model = _load(tmp_path / fmt)
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and module.act_order is act_order
        torch.testing.assert_close(module.dequantize(), weight, rtol=0, atol=0)
    assert not isinstance(model.lm_head, QuantLinear)
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("fmt", "sym", "act_order"), CASES)
def test_legacy_checkpoint_runs_on_the_triton_kernel(
    fmt: str, sym: bool, act_order: bool, tmp_path: Path
) -> None:
    expected, reference = write_checkpoint(tmp_path / fmt, fmt, sym=sym, act_order=act_order)
    model = load_checkpoint(tmp_path / fmt, "AutoModelForCausalLM", "cuda", torch.float16, "triton")
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLinear) and down.kernel == "triton" and down.qweight.is_cuda
    reference = reference.to("cuda", torch.float16)
    for m in (1, 40):  # the GEMV (decode) and the tiled (prefill) kernels
        ids = torch.randint(0, 1024, (1, m), generator=torch.Generator().manual_seed(m)).cuda()
        with torch.no_grad():
            got, want = model(ids).logits.float(), reference(ids).logits.float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_backends_load_their_legacy_formats(tmp_path: Path) -> None:
    """The gptq and awq backends' ``load`` take AutoGPTQ / AutoAWQ folders as they are."""
    write_checkpoint(tmp_path / "gptq", "gptq", sym=True)
    write_checkpoint(tmp_path / "awq", "awq")
    for method in ("gptq", "awq"):
        model = get_backend(method).load(
            tmp_path / method, "AutoModelForCausalLM", "cpu", torch.float32, "torch"
        )
        assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)


@pytest.mark.parametrize(
    ("fmt", "extra", "kernel", "message"),
    [
        ("gptq", {"bits": 8}, "torch", "bits=8: qpipe's QuantLinear holds 4-bit weights only"),
        ("awq", {"version": "gemv"}, "torch", "AutoAWQ version='gemv' is not supported"),
        ("gptq", {"checkpoint_format": "marlin"}, "torch", "checkpoint_format='marlin'"),
        ("gptq", {}, "hf", "kernel=hf cannot load a gptq checkpoint"),
    ],
)
def test_unsupported_legacy_variants_are_one_line_errors(
    fmt: str, extra: dict, kernel: str, message: str, tmp_path: Path
) -> None:
    write_checkpoint(tmp_path / "ckpt", fmt, **extra)
    with pytest.raises(ConfigError) as err:
        _load(tmp_path / "ckpt", kernel)
    assert message in str(err.value) and "\n" not in str(err.value)
