"""An image through a VLM, the way a user's request goes: the model's own processor (InternVL:
448 px tiles, dynamic tiling, ``<img><IMG_CONTEXT>×N</img>``), the vision tower, the language
model. Used by the benchmark (TTFT, vision-encoder time and decode speed with the image in
context, a greedy answer) and by validate_vram (the budgeted workload with the image).

``eval.image``: a path to a picture, or null for the built-in one: drawn here by code (shapes
of known colours on a plain background), so it is the same everywhere and needs no license.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from qpipe.errors import ConfigError

QUESTION = "What shapes are in this picture, and what colour is each one?"
BUILTIN_SIZE = (896, 448)  # 2:1 -> InternVL tiles it 2 × 1 plus a thumbnail: 3 tiles


def builtin_image() -> Image.Image:
    """A red circle, a blue square and a green triangle on white, 896 × 448 px."""
    width, height = BUILTIN_SIZE
    image = Image.new("RGB", BUILTIN_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 104, 300, 344), fill=(220, 30, 30))
    draw.rectangle((340, 104, 580, 344), fill=(30, 60, 220))
    draw.polygon([(740, 94), (620, 354), (860, 354)], fill=(30, 170, 60))
    draw.line((0, height - 40, width, height - 40), fill=(0, 0, 0), width=4)
    return image


def load_image(spec: str | None) -> Image.Image:
    """``eval.image``: null / "builtin" for the built-in picture, else a path to an image."""
    if spec in (None, "", "builtin"):
        return builtin_image()
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.image={spec!r} is not a file; give a picture's path or null")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise ConfigError(f"eval.image={spec!r} is not an image PIL can read ({err})") from None


def image_prompt(processor: Any, question: str) -> str:
    """The question with the image placeholder, through the chat template when the processor
    has one (a downloaded InternVL), else InternVL's plain ``<IMG_CONTEXT>\\n`` form."""
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{processor.image_token}\n{question}"


def image_inputs(
    processor: Any,
    image: Image.Image,
    prompt: str,
    device: str,
    dtype: torch.dtype,
    tail_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids`` (image tokens expanded, then ``tail_ids`` appended), ``attention_mask`` and
    ``pixel_values`` (one row per tile) for one sequence, on ``device``."""
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    ids = batch["input_ids"]
    if tail_ids is not None and tail_ids.numel():
        ids = torch.cat([ids, tail_ids.view(1, -1).to(ids.dtype)], dim=1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": batch["pixel_values"].to(device, dtype),
    }


def count_image_tokens(processor: Any, inputs: dict[str, torch.Tensor]) -> int:
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def _median_s(fn: Any, repeats: int, device: str) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_benchmark(
    model: Any,
    processor: Any,
    image: Image.Image,
    new_tokens: int,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    modes: tuple[str, ...] | list[str] = ("eager",),
    question: str = QUESTION,
) -> dict[str, Any]:
    """With the image in context: the vision encoder alone (tower + projector), TTFT (the
    processor's output in hand: vision encoder + prefill + first token) and decode tokens/s
    through qpipe's decode loop (``modes``: compiled and/or eager, as ``eval.decode``; the
    compiled one is primary where it ran), and the greedy answer to ``question``."""
    from qpipe.evaluation import decode

    inputs = image_inputs(processor, image, image_prompt(processor, question), device, dtype)
    new_tokens = max(int(new_tokens), 2)
    timings: dict[str, Any] = {}
    failure = None
    for mode in modes:
        try:
            timings[mode] = decode.measure(
                model, inputs, new_tokens, compiled=mode == "compiled", repeats=repeats
            )
        except Exception as err:  # compiling is an optimisation: eager still measures
            if mode != "compiled":
                raise
            failure = f"{type(err).__name__}: {str(err).strip()[:200]}"
            if "eager" not in modes:
                timings["eager"] = decode.measure(model, inputs, new_tokens, compiled=False)
    with torch.inference_mode():
        encode = lambda: model.get_image_features(pixel_values=inputs["pixel_values"])  # noqa: E731
        encode()  # warm-up
        vision_s = _median_s(encode, repeats, device)
    primary = "compiled" if "compiled" in timings else "eager"
    timing = timings[primary]
    answer = processor.tokenizer.decode(timing.tokens, skip_special_tokens=True)
    result = {
        "question": question,
        "answer": answer,
        "image_size": list(image.size),
        "tiles": int(inputs["pixel_values"].shape[0]),
        "image_tokens": count_image_tokens(processor, inputs),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "vision_ms": vision_s * 1e3,
        "ttft_image_ms": timing.ttft_ms,
        "decode_tok_s_image": timing.decode_tok_s,
        "decode_mode": primary,
        "compile_failed": failure,
    }
    if primary != "eager" and "eager" in timings:
        result["decode_tok_s_image_eager"] = timings["eager"].decode_tok_s
        result["ttft_image_ms_eager"] = timings["eager"].ttft_ms
    return result


def workload_inputs(
    processor: Any,
    image: Image.Image,
    text_ids: torch.Tensor,
    prompt_tokens: int,
    device: str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The budgeted prompt with the image: the image tokens first, then ``text_ids`` up to
    ``prompt_tokens`` in all. ConfigError when the image alone does not fit."""
    head = image_inputs(processor, image, f"{processor.image_token}\n", "cpu", dtype)
    room = prompt_tokens - head["input_ids"].shape[1]
    if room < 0:
        raise ConfigError(
            f"workload.context_len leaves {prompt_tokens} prompt tokens but the image alone "
            f"takes {head['input_ids'].shape[1]}; raise workload.context_len"
        )
    return image_inputs(
        processor, image, f"{processor.image_token}\n", device, dtype, text_ids[:room]
    )


def source_processor(model_cfg: Any) -> Any | None:
    """The processor of a VLM model config (from its folder's config and tokenizer: random
    weights are not written for it), or None for a text-only model."""
    from qpipe.models import load_config, model_files
    from qpipe.models.processor import is_vlm, load_processor

    config = load_config(model_cfg)
    if not is_vlm(config):
        return None
    return load_processor(model_files(model_cfg), config)


def benchmark_with_image(
    model: Any, model_cfg: Any, eval_cfg: Any, device: str, dtype: torch.dtype, workdir: Path
) -> tuple[dict[str, Any], dict[str, float], list[Path]]:
    """(outputs, metrics, artifacts) of ``image_benchmark`` for the benchmark stage; a text-only
    model gives ({"image": "skipped: ..."}, {}, [])."""
    processor = source_processor(model_cfg)
    if processor is None:
        return {"image": "skipped: text-only model"}, {}, []
    from qpipe.evaluation.decode import modes_for

    image = load_image(eval_cfg.get("image"))
    modes = modes_for(str(eval_cfg.get("image_decode", "eager")), device)
    result = image_benchmark(
        model,
        processor,
        image,
        int(eval_cfg.max_new_tokens),
        int(eval_cfg.repeats),
        device,
        dtype,
        modes,
    )
    path = Path(workdir) / "sample_image.txt"
    path.write_text(
        f"image: {eval_cfg.get('image') or 'builtin'} {result['image_size']}\n"
        f"question: {result['question']}\nanswer: {result['answer']}\n"
    )
    metrics = {
        "perf.ttft_image_ms": result["ttft_image_ms"],
        "perf.vision_ms": result["vision_ms"],
        "perf.image_tokens": float(result["image_tokens"]),
        "perf.image_tiles": float(result["tiles"]),
        # Compiled where it ran, like perf.decode_tok_s; the eager number beside it.
        "perf.decode_tok_s_image": result["decode_tok_s_image"],
        "perf.decode_image_compiled": float(result["decode_mode"] == "compiled"),
    }
    if "decode_tok_s_image_eager" in result:
        metrics["perf.decode_tok_s_image_eager"] = result["decode_tok_s_image_eager"]
        metrics["perf.ttft_image_ms_eager"] = result["ttft_image_ms_eager"]
    return {"image": result}, metrics, [path]
