"""GPTQ, AWQ and RTN through llm-compressor, for real on CPU: config validation, recipes,
calibration data, compressed-tensors checkpoints, and loading them two ways (qpipe QuantLinear
and plain transformers) with the same results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qpipe.backends import QuantizeRequest, get_backend
from qpipe.backends.align import plan_alignment
from qpipe.backends.llmc import build_recipe, recipe_yaml
from qpipe.config.compose import load_group, load_model_group
from qpipe.corpora.calibration import load_calib_texts, token_windows
from qpipe.errors import ConfigError, WeightsUnavailable
from qpipe.kernels import QuantLinear, quantize_rtn
from qpipe.kernels.int_linear import IntLinear
from qpipe.models import materialize
from qpipe.store.paths import data_file
from tests.conftest import save_random_llama


def quant_cfg(name: str, **over: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(load_group("quant", name)), **over}


# -- validation, recipes, calibration (no weights) ---------------------------------------


@pytest.mark.parametrize(
    ("name", "over", "message"),
    [
        ("gptq", {"bits": 5}, "quant.bits=5 is not valid for gptq; use 2, 3, 4 or 8"),
        ("awq", {"bits": 3}, "quant.bits=3 is not valid for awq; use 4 or 8"),
        ("gptq", {"group_size": 100}, "quant.group_size=100 is not valid; use one of 16, 32"),
        ("gptq", {"act_order": "desc"}, "quant.act_order='desc' is not valid; use one of static"),
        ("gptq", {"dampening": 0}, "quant.dampening=0 is not valid"),
        ("awq", {"duo_scaling": "maybe"}, "quant.duo_scaling='maybe' is not valid; use true"),
        ("awq", {"n_grid": 2}, "quant.n_grid=2 is not valid with quant.duo_scaling=True; use an"),
        ("awq", {"n_grid": 3, "duo_scaling": "both"}, "use an integer >= 4"),
        ("rtn", {"format": "gguf"}, "quant.format='gguf' is not valid; use compressed-tensors or"),
        ("gptq", {"groupsize": 64}, "quant.groupsize is not an option of quant.method=gptq"),
    ],
)
def test_bad_quant_values_are_one_line_config_errors(name: str, over: dict, message: str) -> None:
    quant = quant_cfg(name, **over)
    with pytest.raises(ConfigError) as err:
        get_backend(name).unavailable_reason(quant, "cpu")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shipped_quant_options_are_valid_and_runnable_here() -> None:
    for name in ("gptq", "awq", "rtn"):
        quant = quant_cfg(name)
        assert {"name", "method", "bits", "group_size"} <= set(quant)
        assert get_backend(name).unavailable_reason(quant, "cpu") is None
    gptq, rtn = get_backend("gptq"), get_backend("rtn")
    assert gptq.resolve_kernel("triton", quant_cfg("gptq"), "cuda") == "triton"
    assert gptq.resolve_kernel("triton", quant_cfg("gptq", bits=8), "cuda") == "triton"
    # the torch reference takes any width
    assert gptq.resolve_kernel("torch", quant_cfg("gptq", bits=3), "cuda") == "torch"
    with pytest.raises(ConfigError, match="Triton kernels run 4- and 8-bit weights"):
        gptq.resolve_kernel("triton", quant_cfg("gptq", bits=3), "cuda")
    with pytest.raises(ConfigError, match="kernel=hf cannot load quant.format=qpipe-w4"):
        rtn.resolve_kernel("hf", quant_cfg("rtn", format="qpipe-w4"), "cpu")


def test_recipe_has_one_group_per_group_size_and_is_plain_yaml() -> None:
    shapes = {f"model.layers.{i}.{m}": [320, 320] for i in range(2) for m in ("q_proj", "o_proj")}
    shapes |= {f"model.layers.{i}.down_proj": [320, 768] for i in range(2)}
    targets = list(shapes)
    plan = plan_alignment(
        shapes,
        targets,
        group_size=128,
        legal=[16, 32, 64, 128, 256],
        mode="auto",
        fmt="compressed-tensors",
    )
    quant = quant_cfg("gptq", act_order="none", group_size=128)
    recipe = build_recipe(quant, targets, ["lm_head"], plan)
    gptq = recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert gptq["actorder"] is None and gptq["ignore"] == ["lm_head"]
    groups = {g["weights"]["group_size"]: g["targets"] for g in gptq["config_groups"].values()}
    assert groups == {64: ["re:.*\\.o_proj$", "re:.*\\.q_proj$"], 128: ["re:.*\\.down_proj$"]}
    assert yaml.safe_load(recipe_yaml(recipe)) == recipe
    awq = build_recipe(quant_cfg("awq"), targets, [], None)["quant_stage"]["quant_modifiers"]
    assert list(awq) == ["AWQModifier", "QuantizationModifier"]
    assert awq["QuantizationModifier"]["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_calibration_windows_spread_over_the_text() -> None:
    ids = list(range(1000))
    windows = token_windows(ids, num_samples=4, seq_len=100)
    assert [w[0] for w in windows] == [0, 200, 500, 700] and all(len(w) == 100 for w in windows)
    assert len(token_windows(ids, num_samples=50, seq_len=100)) == 10  # all there is
    assert token_windows(ids[:30], num_samples=4, seq_len=100) == [ids[:30]]


def test_calibration_text_is_builtin_and_never_the_eval_text(monkeypatch) -> None:
    calib = {"dataset": None, "num_samples": 8, "seq_len": 128}
    texts = load_calib_texts(calib)
    assert len(texts) == 4 and any("Apache License" in t for t in texts)
    for eval_text in ("eval_gpl3.txt", "eval_pydocs.txt"):
        assert all(data_file(eval_text).read_text()[:2000] not in t for t in texts)
    with pytest.raises(ConfigError, match="calib.seq_len=0 is not valid"):
        load_calib_texts({**calib, "seq_len": 0})
    # A hub dataset goes through datasets.load_dataset; offline that is one clear line.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailable) as err:
        load_calib_texts({**calib, "dataset": "wikitext", "dataset_config": "wikitext-2-raw-v1"})
    assert "cannot load calibration dataset 'wikitext'" in str(err.value)
    assert "calib.dataset=null" in str(err.value) and "\n" not in str(err.value)


# -- a tiny Llama, quantized for real ------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return materialize(load_model_group("smollm2"))


@pytest.fixture(scope="session")
def tiny_llama(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 320 (not a multiple of 128: regrouped to 64), MLP 768, SmolLM2's tokenizer."""
    path = save_random_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        hidden_size=320,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(path)
    return path


def _targets_and_shapes(folder: Path) -> tuple[list[str], dict[str, list[int]]]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [n for n in linears if n != "lm_head"]
    return targets, {n: list(linears[n].weight.shape) for n in targets}


def quantize(
    folder: Path,
    out: Path,
    quant: dict[str, Any],
    samples: int = 4,
    seq_len: int = 64,
    bits: dict[str, int] | None = None,
):
    backend = get_backend(quant["method"])
    assert backend.unavailable_reason(quant, "cpu") is None
    targets, shapes = _targets_and_shapes(folder)
    plan = plan_alignment(
        shapes,
        targets,
        group_size=quant["group_size"],
        legal=backend.legal_group_sizes(quant),
        mode="auto",
        fmt=backend.checkpoint_format(quant),
    )
    request = QuantizeRequest(
        source=folder,
        model_class="AutoModelForCausalLM",
        quant=quant,
        skip_modules=["lm_head"],
        targets=targets,
        output_dir=out,
        device="cpu",
        dtype=torch.float32,
        pad_plan=plan,
        calib_texts=load_calib_texts({"num_samples": samples, "seq_len": seq_len}),
        calib_seq_len=seq_len,
        calib_samples=samples,
        bits_by_module=dict(bits or {}),
    )
    return backend, backend.quantize(request)


def _both_loaders(backend, checkpoint: Path):
    ours = backend.load(checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    plain = backend.load(checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "hf")
    return ours, plain


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
# AWQ with n_grid=5: the grid search dominates its time and is not what this test checks.
def test_tiny_llama_checkpoint_loads_the_same_in_qpipe_and_transformers(
    method: str, tiny_llama: Path, tmp_path: Path
) -> None:
    quant = quant_cfg(method, group_size=128)
    if method == "awq":
        quant["n_grid"] = 5
    backend, result = quantize(tiny_llama, tmp_path / method, quant)
    ckpt = Path(result.checkpoint)
    assert result.format == "compressed-tensors"
    config = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    sizes = sorted(g["weights"]["group_size"] for g in config["config_groups"].values())
    assert sizes == [64, 128]  # K=320 regrouped to 64, down_proj (K=768) keeps 128
    assert (ckpt / "tokenizer.json").is_file() and not list(ckpt.glob("*.partial"))
    recipe = yaml.safe_load(result.recipe.read_text())
    assert (
        list(recipe["quant_stage"]["quant_modifiers"])[0]
        == {"gptq": "GPTQModifier", "awq": "AWQModifier", "rtn": "QuantizationModifier"}[method]
    )
    if method != "rtn":
        assert result.details["calib.tokens"] == 4 * 64

    ours, plain = _both_loaders(backend, ckpt)
    q = ours.get_submodule("model.layers.0.self_attn.q_proj")
    down = ours.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(q, QuantLinear) and (q.group_size, down.group_size) == (64, 128)
    assert q.symmetric is quant["symmetric"]
    assert isinstance(ours.lm_head, torch.nn.Linear) and not isinstance(ours.lm_head, QuantLinear)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    # Same integers, same scales: the dequantized weights are those transformers decompresses
    # (on the first forward pass, hence after it).
    plain_q = plain.get_submodule("model.layers.0.self_attn.q_proj").weight
    torch.testing.assert_close(q.dequantize(), plain_q, rtol=0, atol=0)


def test_mixed_widths_load_with_the_width_each_module_was_quantized_to(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A quant=auto plan: the recipe's groups (8-bit first) are renumbered by compressed-tensors
    when it saves (4-bit first); each module must still load at its own width."""
    targets, _ = _targets_and_shapes(tiny_llama)
    bits = {t: 8 if t.endswith(("q_proj", "down_proj")) else 4 for t in targets}
    backend, result = quantize(tiny_llama, tmp_path / "mixed", quant_cfg("gptq"), bits=bits)
    model = backend.load(
        Path(result.checkpoint), "AutoModelForCausalLM", "cpu", torch.float32, "torch"
    )
    for name in targets:
        module = model.get_submodule(name)
        assert (8 if isinstance(module, IntLinear) else 4) == bits[name], name
        assert isinstance(module, IntLinear if bits[name] == 8 else QuantLinear)


def test_oneshot_frees_the_model(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    """Once quantize returns, nothing holds the calibrated model: on a GPU it would otherwise
    stay in memory through load (6.1 GB for an 8B model, measured on an H200)."""
    import gc
    import weakref

    from transformers import PreTrainedModel

    made: list[weakref.ref] = []
    original = PreTrainedModel.from_pretrained.__func__

    def tracked(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(tracked))
    quantize(tiny_llama, tmp_path / "gptq", quant_cfg("gptq", group_size=128))
    gc.collect()
    assert made, "quantize built no model through from_pretrained"
    assert all(ref() is None for ref in made), "a model outlived quantize"


def test_model_without_tokenizer_calibrates_on_token_ids_and_regroups_alone(
    tmp_path: Path,
) -> None:
    """A random-weight folder has no tokenizer, and a backend called without the pad_align
    stage still gets a legal checkpoint: it makes the plan mode=auto would."""
    save_random_llama(
        tmp_path / "src",
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=512,
    )
    backend = get_backend("gptq")
    request = QuantizeRequest(
        source=tmp_path / "src",
        model_class="AutoModelForCausalLM",
        quant=quant_cfg("gptq", group_size=128),
        skip_modules=["lm_head"],
        targets=[],
        output_dir=tmp_path / "out",
        device="cpu",
        dtype=torch.float32,
        calib_seq_len=32,
        calib_samples=2,
    )
    result = backend.quantize(request)
    assert result.details["calib.source"] == "random token ids"
    assert result.details["calib.tokens"] == 64
    assert result.details["align.summary"].startswith("regroup: 6/7 modules use group_size 64")
    model = backend.load(result.checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    assert model.get_submodule("model.layers.0.mlp.up_proj").group_size == 64


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_qpipe_round_to_nearest(
    symmetric: bool, tiny_llama: Path, tmp_path: Path
) -> None:
    """llm-compressor's RTN and qpipe's reference RTN round the same weights identically."""
    quant = quant_cfg("rtn", group_size=64, symmetric=symmetric)
    backend, result = quantize(tiny_llama, tmp_path / "rtn", quant)
    ours = backend.load(result.checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    source = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        weight = source.get_submodule(name).weight.detach()
        want = quantize_rtn(weight, group_size=64, symmetric=symmetric).dequantize()
        torch.testing.assert_close(ours.get_submodule(name).dequantize(), want, rtol=0, atol=0)


# -- SmolLM2: quality and the round trip through transformers ------------------------------


def perplexity(
    model: torch.nn.Module, tokenizer: Any, tokens: int = 1024, window: int = 512
) -> float:
    text = data_file("eval_gpl3.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1], window):
            chunk = ids[:, start : start + window]
            nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


_FP32: dict[Path, float] = {}


def _fp32_perplexity(folder: Path, tokenizer: Any) -> float:
    """The unquantized model's perplexity, measured once for both methods."""
    if folder not in _FP32:
        _FP32[folder] = perplexity(AutoModelForCausalLM.from_pretrained(folder), tokenizer)
    return _FP32[folder]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_smollm2_checkpoint_reloads_in_transformers_with_the_same_perplexity(
    method: str, smollm2: Path, tmp_path: Path
) -> None:
    backend, result = quantize(
        smollm2, tmp_path / method, quant_cfg(method), samples=8, seq_len=128
    )
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    ours, plain = _both_loaders(backend, Path(result.checkpoint))
    ppl_ours, ppl_plain = perplexity(ours, tokenizer), perplexity(plain, tokenizer)
    assert abs(ppl_ours - ppl_plain) / ppl_plain < 0.005
    fp32 = _fp32_perplexity(smollm2, tokenizer)
    # 4-bit costs quality, but a working quantizer stays near the original.
    assert fp32 < ppl_ours < fp32 * (1.35 if method == "gptq" else 1.6), (fp32, ppl_ours)
