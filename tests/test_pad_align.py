"""pad_align: the plan (regroup / pad / error per format), the stage, and exact padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qpipe.backends import QuantizeRequest, get_backend
from qpipe.backends.align import plan_alignment
from qpipe.errors import ConfigError
from qpipe.kernels import QuantLinear, quantize_rtn
from qpipe.stages import pad_align
from qpipe.stages.base import StageContext, StageResult
from tests.conftest import compose_config, save_random_llama

LEGAL = [16, 32, 64, 128, 256]


def smollm2_layer_shapes(layers: int = 2) -> dict[str, list[int]]:
    """SmolLM2-135M's Linear shapes [out, in]: hidden 576, MLP 1536, 3 KV heads of 64."""
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj": [576, 576],
            f"{p}.self_attn.k_proj": [192, 576],
            f"{p}.self_attn.v_proj": [192, 576],
            f"{p}.self_attn.o_proj": [576, 576],
            f"{p}.mlp.gate_proj": [1536, 576],
            f"{p}.mlp.up_proj": [1536, 576],
            f"{p}.mlp.down_proj": [576, 1536],
        }
    return shapes


def test_regroup_on_k576_picks_64_for_requested_128() -> None:
    shapes = smollm2_layer_shapes()
    plan = plan_alignment(
        shapes, list(shapes), group_size=128, legal=LEGAL, mode="auto", fmt="compressed-tensors"
    )
    assert plan["mode"] == "regroup" and plan["requested_mode"] == "auto"
    q = plan["modules"]["model.layers.0.self_attn.q_proj"]
    assert q == {"K": 576, "group_size": 64, "pad_to": 576}
    # K=1536 is a multiple of 128: left alone, so not listed.
    assert "model.layers.0.mlp.down_proj" not in plan["modules"]
    assert plan["modules_changed"] == 12 and plan["modules_total"] == 14
    assert plan["group_size"] == 64 and plan["group_sizes"] == {"64": 12, "128": 2}
    assert plan["summary"] == "regroup: 12/14 modules use group_size 64 instead of 128 (K=576)"


def test_pad_mode_pads_k_to_a_multiple_of_the_group() -> None:
    shapes = smollm2_layer_shapes(1)
    plan = plan_alignment(
        shapes, list(shapes), group_size=128, legal=LEGAL, mode="auto", fmt="qpipe-w4"
    )
    assert plan["mode"] == "pad"
    assert plan["modules"]["model.layers.0.mlp.up_proj"] == {
        "K": 576,
        "group_size": 128,
        "pad_to": 640,
    }
    assert plan["pad_columns"] == 6 * 64 and plan["group_sizes"] == {"128": 7}


def test_error_mode_names_module_k_group_and_choices() -> None:
    shapes = smollm2_layer_shapes(1)
    with pytest.raises(ConfigError) as err:
        plan_alignment(
            shapes,
            list(shapes),
            group_size=128,
            legal=LEGAL,
            mode="error",
            fmt="compressed-tensors",
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert "model.layers.0.self_attn.q_proj has K=576" in msg and "quant.group_size=128" in msg
    assert "16, 32, 64" in msg and "pad_align.mode=regroup" in msg


def test_pad_is_refused_for_library_formats_and_bad_modes() -> None:
    shapes = smollm2_layer_shapes(1)
    with pytest.raises(ConfigError, match="cannot be used with compressed-tensors"):
        plan_alignment(
            shapes, list(shapes), group_size=128, legal=LEGAL, mode="pad", fmt="compressed-tensors"
        )
    with pytest.raises(ConfigError, match="pad_align.mode='squeeze' is not valid; use one of"):
        plan_alignment(shapes, list(shapes), group_size=128, legal=LEGAL, mode="squeeze", fmt=None)


def test_regroup_with_no_legal_divisor_is_a_clear_error() -> None:
    shapes = {"m.down_proj": [256, 680]}  # 680 = 8 x 85: no legal group size divides it
    with pytest.raises(ConfigError, match="K=680: no legal group size <= 128 divides it"):
        plan_alignment(
            shapes,
            list(shapes),
            group_size=128,
            legal=LEGAL,
            mode="regroup",
            fmt="compressed-tensors",
        )


def test_nothing_to_do_for_groupless_methods_and_legal_shapes() -> None:
    shapes = smollm2_layer_shapes(1)
    bnb = plan_alignment(shapes, list(shapes), group_size=64, legal=None, mode="auto", fmt=None)
    assert bnb["mode"] == "none" and bnb["modules"] == {} and "no groups" in bnb["summary"]
    fine = plan_alignment(
        shapes, list(shapes), group_size=64, legal=LEGAL, mode="error", fmt="compressed-tensors"
    )
    assert fine["mode"] == "none" and fine["modules_changed"] == 0


def _ctx(quant: str, mode: str, shapes: dict[str, list[int]], **over: int) -> StageContext:
    overrides = [f"quant.{k}={v}" for k, v in over.items()]
    cfg = compose_config("model=tiny_llama", f"quant={quant}", f"pad_align.mode={mode}", *overrides)
    upstream = StageResult(outputs={"targets": list(shapes), "shapes": shapes})
    return StageContext(cfg=cfg, inputs={"exclude_layers": upstream}, workdir=Path("."))


def test_stage_reports_plan_and_metrics() -> None:
    shapes = smollm2_layer_shapes(30)
    result = pad_align.run(_ctx("gptq", "auto", shapes, group_size=128))
    assert result.outputs["mode"] == "regroup" and result.outputs["format"] == "compressed-tensors"
    assert result.metrics["align.modules_changed"] == 180.0
    assert result.metrics["align.modules_total"] == 210.0
    assert result.metrics["align.group_size"] == 64.0
    assert result.params == {"pad_align.mode": "regroup"}
    bnb = pad_align.run(_ctx("bnb_nf4", "auto", shapes))
    assert bnb.outputs["mode"] == "none" and bnb.metrics["align.modules_changed"] == 0.0
    default = pad_align.run(_ctx("gptq", "error", shapes))  # g64 divides every SmolLM2 K
    assert default.outputs["mode"] == "none" and default.outputs["group_size"] == 64


def test_padding_is_exact_for_one_layer() -> None:
    """A K=576 layer held zero-padded to 640 gives the outputs of the unpadded weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 96, bias=True)
    padded = QuantLinear.from_linear(linear, group_size=128, pad_to=128, dtype=torch.float32)
    assert padded.k_padded == 640 and padded.in_features == 576
    # Reference: the same rounding on the explicitly zero-padded weight, then sliced back.
    w640 = torch.nn.functional.pad(linear.weight.detach(), (0, 64))
    ref_w = quantize_rtn(w640, group_size=128, scale_dtype=torch.float32).dequantize()[:, :576]
    torch.testing.assert_close(padded.dequantize(), ref_w, rtol=0, atol=0)
    x = torch.randn(5, 576)
    want = torch.nn.functional.linear(x, ref_w, linear.bias.detach())
    torch.testing.assert_close(padded(x), want, rtol=1e-6, atol=1e-6)


def _tiny_llama_folder(path: Path) -> Path:
    """hidden 192 and MLP 320: neither is a multiple of 128."""
    return save_random_llama(
        path,
        hidden_size=192,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def test_rtn_pad_checkpoint_loads_and_matches_dequantized_reference(tmp_path: Path) -> None:
    """End to end: pad plan -> RTN in qpipe-w4 with padded K -> saved -> loaded with
    QuantLinear; logits equal a plain model holding the dequantized (unpadded) weights."""
    src = _tiny_llama_folder(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    targets = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    shapes = {n: list(model.get_submodule(n).weight.shape) for n in targets}
    backend = get_backend("rtn")
    quant = {
        "name": "rtn",
        "method": "rtn",
        "bits": 4,
        "group_size": 128,
        "symmetric": True,
        "format": "qpipe-w4",
    }
    assert backend.unavailable_reason(quant, "cpu") is None
    plan = plan_alignment(
        shapes,
        targets,
        group_size=128,
        legal=backend.legal_group_sizes(quant),
        mode="auto",
        fmt=backend.checkpoint_format(quant),
    )
    assert plan["mode"] == "pad" and plan["modules_changed"] == len(targets)
    req = QuantizeRequest(
        source=src,
        model_class="AutoModelForCausalLM",
        quant=quant,
        skip_modules=["lm_head"],
        targets=targets,
        output_dir=tmp_path / "ckpt",
        device="cpu",
        dtype=torch.float32,
        pad_plan=plan,
    )
    result = backend.quantize(req)
    assert result.format == "qpipe-w4"
    loaded = backend.load(result.checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    down = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLinear) and (down.in_features, down.k_padded) == (320, 384)
    reference = AutoModelForCausalLM.from_pretrained(src)
    for name in targets:
        reference.get_submodule(name).weight.data = loaded.get_submodule(name).dequantize()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="kernel=hf cannot load a qpipe-w4 checkpoint"):
        backend.load(result.checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "hf")
