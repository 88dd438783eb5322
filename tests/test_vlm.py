"""InternVL end to end on CPU (tiny_internvl: the real architecture at toy size): every
quantizer's checkpoint loads under the model's own module names with the vision tower and the
projector untouched, an image goes through InternVL's processor into the benchmark, and the
memory budget prices it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForImageTextToText

from qpipe.app import run_pipeline
from qpipe.backends import QuantizeRequest, get_backend, weight_format_of
from qpipe.config.compose import load_group, load_model_group
from qpipe.corpora.calibration import load_calib_texts
from qpipe.errors import ConfigError
from qpipe.evaluation.vision import (
    benchmark_with_image,
    builtin_image,
    image_benchmark,
    image_inputs,
    image_prompt,
    load_image,
)
from qpipe.kernels import QuantLinear
from qpipe.memory import Workload, arch_dims, build_inventory, estimate
from qpipe.memory.exclusion import plan_precision
from qpipe.models import load_config, load_tokenizer, materialize
from qpipe.models.processor import build_processor, load_processor, tokens_per_tile, vision_dims
from qpipe.tracking.runs import default_tracking_uri
from tests.conftest import compose_config

CLASS = "AutoModelForImageTextToText"


@pytest.fixture(scope="session")
def tiny() -> tuple[Any, Path]:
    cfg = load_model_group("tiny_internvl")
    return load_config(cfg), materialize(cfg)


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A square picture: one 224 px tile for tiny_internvl, so the CPU tests stay quick."""
    path = tmp_path_factory.mktemp("img") / "square.png"
    builtin_image().resize((224, 224)).save(path)
    return path


# -- the picture and its cost ----------------------------------------------------------------


def test_builtin_image_is_drawn_the_same_every_time_and_tiles_like_internvl() -> None:
    assert builtin_image().tobytes() == builtin_image().tobytes()
    config = load_config(load_model_group("internvl"))
    v = vision_dims(config, *builtin_image().size)
    # 896 × 448 = 2:1 -> a 2 × 1 grid of 448 px tiles + the thumbnail; 256 tokens a tile.
    assert (v.tiles, tokens_per_tile(config), v.image_tokens) == (3, 256, 770)
    assert (v.patches_per_tile, v.projector_in, v.lm_hidden) == (1024, 4096, 4096)


def test_a_bad_image_path_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.image='/no/such.png' is not a file"):
        load_image("/no/such.png")
    junk = tmp_path / "junk.png"
    junk.write_text("not a picture")
    with pytest.raises(ConfigError, match="is not an image PIL can read"):
        load_image(str(junk))


def test_memory_estimate_prices_the_image_tokens_and_the_vision_tower() -> None:
    config = load_config(load_model_group("internvl"))
    inv = build_inventory(config, CLASS)
    quant = OmegaConf.to_container(load_group("quant", "rtn"))
    plan = plan_precision(inv, {}, quantize=True)
    dims, work = arch_dims(config), Workload(context_len=4096)
    vision = vision_dims(config, *builtin_image().size)
    fmt = weight_format_of(quant, 2, "cuda")
    text = estimate(inv, plan, fmt, dims, work, 2)
    both = estimate(inv, plan, fmt, dims, work, 2, vision=vision)
    # Image tokens sit inside the context: the KV cache is the same, their share is priced.
    assert both.kv_cache_gb == text.kv_cache_gb
    per_token = 2 * 36 * 8 * 128 * 2  # K and V, 36 layers, 8 KV heads of 128, bf16
    assert both.image_tokens == 770
    assert both.image_kv_cache_gb == pytest.approx(770 * per_token / 1e9)
    # 3 tiles × 1025 tokens through a 4096-wide MLP, plus the pixels: tens of MB.
    assert 0.02 < both.vision_activations_gb < 0.1
    # The prompt's features wait in the LM's width during prefill: the peak grows by them.
    assert both.peak_gb - text.peak_gb == pytest.approx(3 * 256 * 4096 * 2 / 1e9)


# -- checkpoints of every format --------------------------------------------------------------

FORMATS = {
    "none": ("none", {}),
    "bnb_nf4": ("bnb_nf4", {}),
    "bnb_int8": ("bnb_int8", {}),
    "rtn": ("rtn", {}),
    "rtn-qpipe-w4": ("rtn", {"format": "qpipe-w4"}),
    "gptq": ("gptq", {}),
    "awq": ("awq", {"n_grid": 5}),  # the grid search is not what this test checks
}


def _quantize(source: Path, config: Any, out: Path, option: str, over: dict) -> tuple[Any, Path]:
    quant = {**OmegaConf.to_container(load_group("quant", option)), **over}
    backend = get_backend(quant["method"])
    plan = plan_precision(build_inventory(config, CLASS), {}, quantize=quant["method"] != "none")
    request = QuantizeRequest(
        source=source,
        model_class=CLASS,
        quant=quant,
        skip_modules=sorted(plan.skip),
        targets=plan.targets,
        output_dir=out,
        device="cpu",
        dtype=torch.float32,
        calib_texts=load_calib_texts({"num_samples": 4, "seq_len": 64}),
        calib_seq_len=64,
        calib_samples=4,
    )
    return backend, backend.quantize(request).checkpoint


def _quantized_type(module: torch.nn.Module) -> str:
    name = type(module).__name__
    return "plain" if type(module) is torch.nn.Linear else name


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_internvl_checkpoint_loads_with_the_models_names_vision_kept_exact(
    fmt: str, tiny: tuple[Any, Path], small_image: Path, tmp_path: Path
) -> None:
    config, source = tiny
    option, over = FORMATS[fmt]
    backend, checkpoint = _quantize(source, config, tmp_path / fmt, option, over)
    model = backend.load(checkpoint, CLASS, "cpu", torch.float32, "torch")
    reference = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()

    ref_modules = dict(reference.named_modules())
    kinds: dict[str, set[str]] = {"vision": set(), "projector": set(), "lm": set()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and "Linear" not in type(module).__name__:
            continue
        part = (
            "vision"
            if ".vision_tower." in f".{name}."
            else "projector"
            if "multi_modal_projector" in name
            else "lm"
        )
        if part != "lm":  # high precision, bit for bit the source's weights
            torch.testing.assert_close(module.weight, ref_modules[name].weight, rtol=0, atol=0)
        if name != "lm_head":
            kinds[part].add(_quantized_type(module))
    assert kinds["vision"] == kinds["projector"] == {"plain"}
    expected_lm = {
        "none": "plain",
        "bnb_nf4": "Linear4bit",
        "bnb_int8": "Linear8bitLt",
    }.get(option, QuantLinear.__name__)
    assert kinds["lm"] == {expected_lm}
    assert _quantized_type(model.lm_head) == "plain"

    # The whole model, image included, answers like the source model (4-bit noise aside).
    processor = load_processor(source, config)
    image = load_image(str(small_image))
    inputs = image_inputs(
        processor, image, image_prompt(processor, "Shapes?"), "cpu", torch.float32
    )
    with torch.no_grad():
        got = model(**inputs).logits[0, -8:].flatten()
        want = reference(**inputs).logits[0, -8:].flatten()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    assert cosine > (0.9999 if fmt == "none" else 0.9), cosine
    if option in ("rtn", "gptq", "awq") and "format" not in over:
        # compressed-tensors: transformers' own loader (kernel=hf) gives the same logits.
        plain = backend.load(checkpoint, CLASS, "cpu", torch.float32, "hf")
        with torch.no_grad():
            torch.testing.assert_close(
                plain(**inputs).logits[0, -8:].flatten(), got, rtol=1e-4, atol=1e-4
            )


# -- the image in the benchmark -----------------------------------------------------------


def test_image_benchmark_times_the_vision_tower_prefill_and_decode(
    tiny: tuple[Any, Path], small_image: Path
) -> None:
    config, source = tiny
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    processor = load_processor(source, config)
    out = image_benchmark(
        model, processor, load_image(str(small_image)), 4, 1, "cpu", torch.float32
    )
    assert (out["tiles"], out["image_tokens"]) == (1, 64)  # 224 px tile, 16² patches / 4
    assert out["prompt_tokens"] > out["image_tokens"] + 2
    assert 0 < out["vision_ms"] < out["ttft_image_ms"]
    assert out["decode_tok_s_image"] > 0 and out["decode_mode"] == "eager"
    # The answer is the greedy continuation the decode loop produced: generate agrees.
    inputs = image_inputs(
        processor,
        load_image(str(small_image)),
        image_prompt(processor, out["question"]),
        "cpu",
        torch.float32,
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert processor.tokenizer.decode(ids[0, n:], skip_special_tokens=True) == out["answer"]


def test_pipeline_on_tiny_internvl_logs_the_image_metrics(
    small_image: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        "model=tiny_internvl",
        "quant=none",  # the formats are the test above; this one is about the image path
        "eval=quick",
        "eval.baseline=false",
        f"eval.image={small_image}",
        "workload.context_len=192",
        "eval.repeats=3",  # medians: the time to first token holds the vision encoder's
        "mlflow.experiment=vlm",
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED", report.error
    m = report.metrics
    assert m["mem.est_image_tokens"] == 66 and m["perf.image_tokens"] == 64
    assert report.results["validate_vram"].outputs["image_tokens"] == 64
    assert m["perf.ttft_image_ms"] > m["perf.vision_ms"] > 0 and m["perf.decode_tok_s_image"] > 0
    sample = report.results["benchmark"].outputs["image"]
    mlflow.set_tracking_uri(default_tracking_uri())
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(report.run_id, "artifacts")}
    assert "artifacts/sample_image.txt" in files and sample["question"].startswith("What shapes")


def test_text_only_model_skips_the_image_cleanly(tmp_path: Path) -> None:
    cfg = compose_config("model=tiny_llama", "pipeline=estimate", "eval.image=/no/such.png")
    report = run_pipeline(cfg, tmp_path / "run")  # the image is never looked at
    assert report.status == "FINISHED", report.error
    assert not any(k.startswith("mem.est_image") for k in report.metrics)
    outputs, metrics, files = benchmark_with_image(
        None, cfg.model, cfg.eval, "cpu", torch.float32, tmp_path
    )
    assert outputs == {"image": "skipped: text-only model"} and metrics == {} and files == []


def test_context_too_short_for_the_image_stops_before_weights_move(tmp_path: Path) -> None:
    cfg = compose_config("model=tiny_internvl", "eval=quick", "workload.context_len=128")
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FAILED" and report.failed_stage == "memory_budget"
    assert "cannot hold the image (9 tiles = 578 tokens)" in report.error
    assert "workload.context_len>=588" in report.error


def test_tokenizer_that_misplaces_the_image_token_is_named(tiny: tuple[Any, Path]) -> None:
    config, source = tiny
    wrong = config.__class__.from_dict({**config.to_dict(), "image_token_id": 7})
    with pytest.raises(ConfigError, match="puts <IMG_CONTEXT> at id 49154, but the model's"):
        load_processor(source, wrong)


def test_qwen_tokenizer_has_qwens_ids_and_internvls_image_tokens() -> None:
    model_cfg = OmegaConf.merge(load_model_group("internvl"), {"weights": "random"})
    tokenizer = load_tokenizer(model_cfg)  # model.tokenizer=qwen: built from the package's BPE
    assert tokenizer("Hello, world! 12").input_ids == [9707, 11, 1879, 0, 220, 16, 17]
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<think>"]) == [151645, 151667]
    # The real architecture's processor around it: 3 tiles × 256 <IMG_CONTEXT> = 151671.
    processor = build_processor(load_config(model_cfg), tokenizer)
    batch = processor(
        images=[builtin_image()], text=[image_prompt(processor, "Shapes?")], return_tensors="pt"
    )
    assert int((batch["input_ids"] == 151671).sum()) == 768
    assert tuple(batch["pixel_values"].shape) == (3, 3, 448, 448)
