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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _median_s(fn: Any, repeats: int, device: str) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, pad: int) -> Any:
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )


def image_benchmark(
    model: Any,
    processor: Any,
    image: Image.Image,
    new_tokens: int,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    question: str = QUESTION,
) -> dict[str, Any]:
    """TTFT with the image (processor output in hand: vision tower + projector + prefill +
    first token), the vision encoder alone, decode tokens/s with the image in context, and
    the greedy answer to ``question``. Medians over ``repeats`` after one warm-up."""
    inputs = image_inputs(processor, image, image_prompt(processor, question), device, dtype)
    pad = processor.tokenizer.pad_token_id or 0
    new_tokens = max(int(new_tokens), 2)
    with torch.inference_mode():
        _generate(model, inputs, 2, pad)  # warm-up: kernels, autotuning
        vision_s = _median_s(
            lambda: model.get_image_features(pixel_values=inputs["pixel_values"]),
            repeats,
            device,
        )
        ttft_s = _median_s(lambda: _generate(model, inputs, 1, pad), repeats, device)
        out = None

        def full() -> None:
            nonlocal out
            out = _generate(model, inputs, new_tokens, pad)

        total_s = _median_s(full, repeats, device)
    prompt_len = inputs["input_ids"].shape[1]
    answer = processor.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    decode_s = total_s - ttft_s
    return {
        "question": question,
        "answer": answer,
        "image_size": list(image.size),
        "tiles": int(inputs["pixel_values"].shape[0]),
        "image_tokens": count_image_tokens(processor, inputs),
        "prompt_tokens": int(prompt_len),
        "vision_ms": vision_s * 1e3,
        "ttft_image_ms": ttft_s * 1e3,
        # None when timing noise swallowed the decode (a loaded CPU): no number beats a wrong one.
        "decode_tok_s_image": (new_tokens - 1) / decode_s if decode_s > 0 else None,
    }


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
    """The processor of a VLM model config (from its materialised folder), or None for a
    text-only model."""
    from qpipe.models import load_config, materialize
    from qpipe.models.processor import is_vlm, load_processor

    config = load_config(model_cfg)
    if not is_vlm(config):
        return None
    return load_processor(materialize(model_cfg), config)


def benchmark_with_image(
    model: Any, model_cfg: Any, eval_cfg: Any, device: str, dtype: torch.dtype, workdir: Path
) -> tuple[dict[str, Any], dict[str, float], list[Path]]:
    """(outputs, metrics, artifacts) of ``image_benchmark`` for the benchmark stage; a text-only
    model gives ({"image": "skipped: ..."}, {}, [])."""
    processor = source_processor(model_cfg)
    if processor is None:
        return {"image": "skipped: text-only model"}, {}, []
    image = load_image(eval_cfg.get("image"))
    result = image_benchmark(
        model, processor, image, int(eval_cfg.max_new_tokens), int(eval_cfg.repeats), device, dtype
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
    }
    if result["decode_tok_s_image"] is not None:
        metrics["perf.decode_tok_s_image"] = result["decode_tok_s_image"]
    return {"image": result}, metrics, [path]
