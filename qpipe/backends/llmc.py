"""GPTQ, AWQ and RTN through llm-compressor: config validation, recipe building, calibration
data and the ``oneshot`` call, shared by the three backends.

The recipe is built as plain data from the ``quant`` config, written as YAML and handed to
``oneshot`` as that YAML: the file saved next to the checkpoint (``recipe.yaml``) is exactly
what ran, and ``llmcompressor.oneshot(model=..., recipe="recipe.yaml")`` reproduces it.
Checkpoints are compressed-tensors ``pack-quantized`` folders (transformers and vLLM load them)
with the tokenizer saved alongside, so a folder is self-contained.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from qpipe.backends.align import module_group_size, plan_alignment
from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.config.safety import trust_remote_code
from qpipe.corpora.calibration import (
    BUILTIN,
    builtin_texts,
    load_calib_texts,
    synthetic_windows,
    token_windows,
)
from qpipe.errors import BackendUnavailable, ConfigError

CT_FORMAT = "compressed-tensors"
# Group sizes our formats accept: compressed-tensors takes any divisor of K, but qpipe's
# Triton kernel tiles K in multiples of 16 that must divide the group; regroup picks the
# largest of these that divides K (16 only for odd widths such as 688 = 43 x 16).
LEGAL_GROUP_SIZES = [16, 32, 64, 128, 256]
ACT_ORDERS = ("static", "group", "weight", "none")

_COMMON_KEYS = {"name", "method", "bits", "group_size", "symmetric"}
_KEYS = {
    "gptq": _COMMON_KEYS | {"act_order", "dampening", "block_size"},
    "awq": _COMMON_KEYS | {"duo_scaling", "n_grid"},
    "rtn": _COMMON_KEYS | {"format"},
}
# Widths llm-compressor's scheme and compressed-tensors' packing take (any of 1..8); 4-bit runs on
# qpipe's Triton kernel, the others on the torch reference (IntLinear) or transformers.
_BITS = {"gptq": (2, 3, 4, 8), "awq": (4, 8), "rtn": (2, 3, 4, 8)}


# -- validation ----------------------------------------------------------------------------


def _or(values: Sequence[Any]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_quant(quant: Mapping[str, Any]) -> None:
    """One-line ConfigError naming the bad ``quant`` value and the valid ones. Cheap: no
    library import, no weights; call it before any heavy work."""
    method = quant.get("method")
    if method not in _KEYS:
        raise ConfigError(f"quant.method={method!r} is not one of {', '.join(_KEYS)}")
    unknown = sorted(set(quant) - _KEYS[method])
    if unknown:
        raise ConfigError(
            f"quant.{unknown[0]} is not an option of quant.method={method}; "
            f"valid: {', '.join(sorted(_KEYS[method]))}"
        )
    bits = quant.get("bits")
    if bits not in _BITS[method] or not _is_int(bits):
        raise ConfigError(
            f"quant.bits={bits!r} is not valid for {method}; use {_or(_BITS[method])}"
        )
    gs = quant.get("group_size")
    if not _is_int(gs) or (gs != 0 and gs not in LEGAL_GROUP_SIZES):
        raise ConfigError(
            f"quant.group_size={gs!r} is not valid; use one of "
            f"{', '.join(map(str, LEGAL_GROUP_SIZES))} or 0 (one scale per output channel)"
        )
    if not isinstance(quant.get("symmetric", True), bool):
        raise ConfigError(
            f"quant.symmetric={quant.get('symmetric')!r} is not valid; use true or false"
        )
    if method == "gptq":
        _validate_gptq(quant)
    elif method == "awq":
        _validate_awq(quant)
    else:
        fmt = quant.get("format", CT_FORMAT)
        from qpipe.backends.qlinear_loader import QPIPE_W4

        if fmt not in (CT_FORMAT, QPIPE_W4):
            raise ConfigError(f"quant.format={fmt!r} is not valid; use {CT_FORMAT} or {QPIPE_W4}")
        if fmt == QPIPE_W4 and bits != 4:
            raise ConfigError(f"quant.format={QPIPE_W4} holds 4-bit weights; set quant.bits=4")


def _validate_gptq(quant: Mapping[str, Any]) -> None:
    act = _act_order(quant)
    if act not in ACT_ORDERS:
        raise ConfigError(
            f"quant.act_order={quant.get('act_order')!r} is not valid; use one of {', '.join(ACT_ORDERS)}"
        )
    damp = quant.get("dampening", 0.01)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
        raise ConfigError(f"quant.dampening={damp!r} is not valid; use a number in (0, 1]")
    block = quant.get("block_size", 128)
    if not _is_int(block) or block < 1:
        raise ConfigError(f"quant.block_size={block!r} is not valid; use a positive integer")


def _act_order(quant: Mapping[str, Any]) -> Any:
    act = quant.get("act_order", "static")
    return "none" if act is None else act


def _validate_awq(quant: Mapping[str, Any]) -> None:
    duo = quant.get("duo_scaling", True)
    if not (duo is True or duo is False or duo == "both"):
        raise ConfigError(f"quant.duo_scaling={duo!r} is not valid; use true, false or both")
    grid = quant.get("n_grid", 20)
    if not _is_int(grid) or grid < 2:
        raise ConfigError(f"quant.n_grid={grid!r} is not valid; use an integer >= 2")


def validate_kernel(quant: Mapping[str, Any], kernel: str) -> None:
    """One-line ConfigError when ``kernel`` cannot run the checkpoint ``quant`` will produce:
    found before quantizing, not after."""
    from qpipe.backends.qlinear_loader import QPIPE_W4

    if kernel == "triton" and int(quant.get("bits", 4)) != 4:
        raise ConfigError(
            f"quant.bits={quant.get('bits')} with kernel=triton: qpipe's Triton kernels run "
            "4-bit weights only; use kernel=torch or auto (torch reference), kernel=hf, or "
            "quant.bits=4"
        )
    if kernel == "hf" and quant.get("format") == QPIPE_W4:
        raise ConfigError(
            f"kernel=hf cannot load quant.format={QPIPE_W4} (qpipe's own layout); "
            "use kernel=torch|triton or quant.format=compressed-tensors"
        )


def calibration_texts(calib: Mapping[str, Any]) -> list[str]:
    """The texts of the ``calib`` config group (see ``qpipe.corpora.calibration``)."""
    return load_calib_texts(calib)


def llmcompressor_missing() -> str | None:
    """Why llm-compressor cannot be used here (None when it can)."""
    if importlib.util.find_spec("llmcompressor") is None:
        return "llm-compressor is not installed: pip install 'llmcompressor>=0.14,<0.15'"
    return None


# -- recipe ----------------------------------------------------------------------------------


def _weights_args(quant: Mapping[str, Any], group_size: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": int(quant["bits"]),
        "type": "int",
        "symmetric": bool(quant.get("symmetric", True)),
    }
    if group_size > 0:
        args.update(strategy="group", group_size=group_size)
    else:
        args["strategy"] = "channel"
    return args


def _compact_targets(names: Sequence[str], same_leaf_elsewhere: set[str]) -> list[str]:
    """Module names as a short target list: ``re:.*\\.<leaf>$`` for a leaf name (q_proj...)
    whose targeted modules all fall in this group, exact names otherwise."""
    by_leaf: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_leaf[n.rsplit(".", 1)[-1]].append(n)
    out: list[str] = []
    for leaf, members in sorted(by_leaf.items()):
        if leaf in same_leaf_elsewhere:
            out.extend(sorted(members))
        else:
            out.append(f"re:.*\\.{re.escape(leaf)}$" if "." in members[0] else members[0])
    return out


def config_groups(
    quant: Mapping[str, Any],
    targets: Sequence[str],
    pad_plan: Mapping[str, Any] | None,
    bits: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """compressed-tensors config groups: one per (bit width, group size) the targets use
    (``bits``: a mixed plan's width per module; absent ones use ``quant.bits``). A single
    group targets every ``Linear`` (the recipe's ``ignore`` keeps the rest out)."""
    default = int(quant.get("group_size") or 0)
    width = int(quant["bits"])
    by_scheme: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in targets:
        gs = module_group_size(pad_plan, name, default)
        by_scheme[(int((bits or {}).get(name, width)), gs)].append(name)
    if len(by_scheme) <= 1:
        b, gs = next(iter(by_scheme), (width, default))
        args = _weights_args({**quant, "bits": b}, gs)
        return {"group_0": {"targets": ["Linear"], "weights": args}}
    leaves = {key: {n.rsplit(".", 1)[-1] for n in names} for key, names in by_scheme.items()}
    groups = {}
    for i, (key, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))):
        elsewhere = set().union(*(lv for k, lv in leaves.items() if k != key))
        groups[f"group_{i}"] = {
            "targets": _compact_targets(names, elsewhere),
            "weights": _weights_args({**quant, "bits": key[0]}, key[1]),
        }
    return groups


def build_recipe(
    quant: Mapping[str, Any],
    targets: Sequence[str],
    ignore: Sequence[str],
    pad_plan: Mapping[str, Any] | None = None,
    awq_mappings: list[dict[str, Any]] | None = None,
    bits: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The llm-compressor recipe for ``quant`` as plain data (YAML-ready); ``bits`` gives a
    mixed plan's width per target."""
    method = quant["method"]
    groups = config_groups(quant, targets, pad_plan, bits)
    scheme = {"ignore": list(ignore), "config_groups": groups}
    if method == "gptq":
        act = _act_order(quant)
        modifiers: dict[str, Any] = {
            "GPTQModifier": {
                **scheme,
                "dampening_frac": float(quant.get("dampening", 0.01)),
                "block_size": int(quant.get("block_size", 128)),
                "actorder": None if act == "none" else act,
            }
        }
    elif method == "awq":
        awq: dict[str, Any] = {
            "duo_scaling": quant.get("duo_scaling", True),
            "n_grid": int(quant.get("n_grid", 20)),
        }
        if awq_mappings is not None:
            awq["mappings"] = awq_mappings
        # AWQ only rescales (exactly, in full precision); the quantizer after it rounds.
        modifiers = {"AWQModifier": awq, "QuantizationModifier": scheme}
    elif method == "rtn":
        modifiers = {"QuantizationModifier": scheme}
    else:
        raise ConfigError(f"quant.method={method!r} has no llm-compressor recipe")
    return {"quant_stage": {"quant_modifiers": modifiers}}


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    header = "# llm-compressor recipe written by qpipe; re-run with oneshot(recipe=this file)\n"
    return header + yaml.safe_dump(dict(recipe), sort_keys=False, width=100)


# -- calibration -----------------------------------------------------------------------------


class _PretokenizedOnly:
    """Stands in for a tokenizer when the source folder has none (random-weight models).
    oneshot wants a processor object, but it only tokenizes text; our data is token ids."""


def calibration_data(
    tokenizer: Any, request: QuantizeRequest, vocab_size: int
) -> tuple[Any, dict[str, Any]]:
    """A tokenized ``datasets.Dataset`` of calibration windows and what it holds."""
    from datasets import Dataset

    n, seq_len = int(request.calib_samples), int(request.calib_seq_len)
    if tokenizer is None:
        windows, source = synthetic_windows(vocab_size, n, seq_len), "random token ids"
    else:
        texts = request.calib_texts or builtin_texts()
        source = "texts" if request.calib_texts else f"builtin:{BUILTIN}"
        ids: list[int] = []
        for text in texts:  # one document after another, like one long text
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        windows = token_windows(ids, n, seq_len)
        if not windows:
            raise ConfigError("the calibration texts are empty; set calib.dataset=null")
    ds = Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]}
    )
    details = {
        "calib.source": source,
        "calib.samples": len(windows),
        "calib.seq_len": seq_len,
        "calib.tokens": sum(len(w) for w in windows),
    }
    return ds, details


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def source_tokenizer(source: Path) -> Any:
    """The tokenizer saved in ``source``, or None when the folder has none."""
    from transformers import AutoTokenizer

    # transformers 5 makes an empty tokenizer from config.json alone: look for its files.
    if not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code())
    except (OSError, ValueError, TypeError):
        # No tokenizer files: a random-weight model folder. Calibration falls back to
        # random token ids, which carry no meaning for such a model anyway.
        return None


# -- quantization ---------------------------------------------------------------------------


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _scoped(pattern: str, prefix: str) -> str:
    # "re:.*input_layernorm$" -> "re:model\.language_model\..*input_layernorm$"
    if prefix and pattern.startswith("re:.*"):
        return "re:" + re.escape(prefix) + pattern[3:]
    return pattern


def _awq_mappings(model: torch.nn.Module, targets: Sequence[str]) -> list[dict[str, Any]]:
    """The library's AWQ mappings for this architecture (Llama, Qwen3, ...), written into the
    recipe so that it states what was smoothed instead of relying on inference. The library's
    patterns match any module with the leaf name; they are scoped to where the targets live,
    so that a VLM's vision tower (whose q/k/v projections have no o_proj) stays out."""
    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

    blocks = _decoder_blocks(model, targets)
    prefix = blocks[0] + "." if blocks else ""
    out = []
    for m in get_layer_mappings_from_model(model):
        entry = {
            "smooth_layer": _scoped(m.smooth_layer, prefix),
            "balance_layers": [_scoped(b, prefix) for b in m.balance_layers],
        }
        if m.activation_hook_target is not None:
            entry["activation_hook_target"] = m.activation_hook_target
        out.append(entry)
    return out


def _pad_plan(
    request: QuantizeRequest, model: torch.nn.Module, targets: list[str]
) -> dict[str, Any]:
    """The pad_align stage's plan; without one (the backend used on its own) the same plan
    ``pad_align.mode=auto`` would make, so a legal checkpoint comes out either way."""
    plan = dict(request.pad_plan or {})
    if plan.get("mode") == "pad":
        raise ConfigError(
            f"pad_align.mode=pad cannot be used with {CT_FORMAT} checkpoints "
            "(transformers and vLLM expect the model's shapes); use pad_align.mode=regroup"
        )
    if plan:
        return plan
    shapes = {n: list(model.get_submodule(n).weight.shape) for n in targets}
    return plan_alignment(
        shapes,
        targets,
        group_size=int(request.quant.get("group_size") or 0),
        legal=LEGAL_GROUP_SIZES,
        mode="auto",
        fmt=CT_FORMAT,
    )


def _calibration_kwargs(
    request: QuantizeRequest, model: torch.nn.Module, tokenizer: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """oneshot's dataset arguments for GPTQ/AWQ (none for RTN) and what the data holds."""
    if request.quant["method"] not in ("gptq", "awq"):
        return {}, {}
    vocab = int(
        getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings
    )
    ds, details = calibration_data(tokenizer, request, vocab)
    blocks = _decoder_blocks(model, request.targets or _linear_names(model))
    layer = blocks[1] if blocks else None
    kwargs = {
        "dataset": ds,
        "num_calibration_samples": len(ds),
        "max_seq_length": int(request.calib_seq_len),
        # Shuffling draws from the global RNG; every window is used anyway.
        "shuffle_calibration_samples": False,
        # One decoder layer at a time on the accelerator, activations cached between layers:
        # what keeps an 8B GPTQ/AWQ at minutes. Named, not inferred, so that a VLM's vision
        # layers (which text calibration never runs) are not made pipeline stages.
        "pipeline": "sequential",
    }
    if layer is not None:
        kwargs["sequential_targets"] = [layer]
    details["calib.sequential_targets"] = layer or "library default"
    return kwargs, details


def _decoder_blocks(model: torch.nn.Module, targets: Sequence[str]) -> tuple[str, str] | None:
    """(path of the ModuleList, class of its blocks) of the repeated decoder layers that hold
    the quantization targets: ("model.language_model.layers", "Qwen3DecoderLayer") for
    InternVL. Targets outside any block (lm_head) are passed over."""
    for target in targets:
        parts = target.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[: depth - 1])
            if isinstance(model.get_submodule(parent), torch.nn.ModuleList):
                child = model.get_submodule(".".join(parts[:depth]))
                return parent, type(child).__name__
    return None
    parts = targets[0].split(".")
    for depth in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[: depth - 1])) if depth > 1 else model
        child = model.get_submodule(".".join(parts[:depth]))
        if isinstance(parent, torch.nn.ModuleList):
            return type(child).__name__
    return None


def _name_both_ways(out: Path, recipe: Mapping[str, Any]) -> None:
    """transformers saves some architectures under their original checkpoint names (InternVL:
    ``vision_tower.*`` for the module ``model.vision_tower.*``) and renames the quantization
    config's module names with them, but does not rename them back when it loads: the vision
    tower would no longer be ignored, and loading fails. The config lists each name in both
    forms (a name that matches no module is harmless)."""
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    qcfg = config.get("quantization_config") or {}
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    scheme = next(m for m in modifiers.values() if "config_groups" in m)

    def union(saved: list[str], ours: list[str]) -> list[str]:
        return list(dict.fromkeys([*saved, *ours]))

    def kind(group: Mapping[str, Any]) -> tuple:
        weights = group.get("weights") or {}
        return tuple(weights.get(k) for k in ("num_bits", "group_size", "symmetric", "strategy"))

    qcfg["ignore"] = union(list(qcfg.get("ignore") or []), list(scheme["ignore"]))
    for group in (qcfg.get("config_groups") or {}).values():
        # compressed-tensors numbers the saved groups afresh: a mixed plan's saved group_0 may
        # be the recipe's group_1. Groups are matched by their weights' scheme, never by name.
        ours = [
            t
            for g in scheme["config_groups"].values()
            if kind(g) == kind(group)
            for t in g.get("targets", [])
        ]
        group["targets"] = union(list(group.get("targets") or []), ours)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _save(
    model: torch.nn.Module, tokenizer: Any, recipe_text: str, recipe: Mapping[str, Any], out: Path
) -> Path:
    model.save_pretrained(out, save_compressed=True)
    _name_both_ways(out, recipe)
    # llm-compressor writes its own serialisation of the recipe (with Python-object tags that
    # yaml.safe_load rejects); the file we ran is the readable, re-runnable one.
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(recipe_text)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return recipe_path


def quantize_with_llmc(request: QuantizeRequest) -> QuantizeResult:
    """Run ``request.quant`` (gptq/awq/rtn, compressed-tensors format) through oneshot and
    save the compressed checkpoint, tokenizer and recipe into ``request.output_dir``."""
    validate_quant(request.quant)
    missing = llmcompressor_missing()
    if missing:
        raise BackendUnavailable(missing)
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    from qpipe.backends._llmc_patches import forget_fx_wraps, skip_pinning_without_accelerator
    from qpipe.backends.qlinear_loader import auto_class

    method = request.quant["method"]
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = auto_class(request.model_class).from_pretrained(
        request.source, dtype=request.dtype, trust_remote_code=trust_remote_code()
    )
    if not request.keep_in_host:
        # Otherwise oneshot's pipelines onload each module to the GPU only while it runs
        # (compressed_tensors' set_onload_device): a model larger than the GPU quantizes.
        model.to(request.device)
    linears = _linear_names(model)
    targets = list(request.targets) or [n for n in linears if n not in set(request.skip_modules)]
    unknown = [t for t in targets if t not in set(linears)]
    if unknown:
        raise ConfigError(f"quantize: target {unknown[0]!r} is not a Linear module of the model")
    plan = _pad_plan(request, model, targets)
    recipe = build_recipe(
        request.quant,
        targets,
        [n for n in linears if n not in set(targets)],
        plan,
        awq_mappings=_awq_mappings(model, targets) if method == "awq" else None,
        bits=request.bits_by_module,
    )
    text = recipe_yaml(recipe)
    tokenizer = source_tokenizer(request.source)
    kwargs, details = _calibration_kwargs(request, model, tokenizer)
    if method == "awq":
        skip_pinning_without_accelerator()
    start = time.perf_counter()
    with forget_fx_wraps():
        oneshot(
            model=model,
            recipe=text,
            processor=tokenizer if tokenizer is not None else _PretokenizedOnly(),
            **kwargs,
        )
    details["quant.oneshot_s"] = round(time.perf_counter() - start, 2)
    recipe_path = _save(model, tokenizer, text, recipe, out)
    # oneshot's session keeps the model alive after it returns: reset it, or the whole
    # calibrated model stays on the GPU through load and is counted as the loaded model's.
    reset_session()
    del model
    details.update(
        {
            "quant.format": CT_FORMAT,
            "quant.modules": len(targets),
            "quant.group_sizes": ",".join(sorted(plan["group_sizes"], key=int)),
            "align.summary": plan["summary"],
            "checkpoint.mb": round(
                sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 2
            ),
        }
    )
    return QuantizeResult(checkpoint=out, format=CT_FORMAT, recipe=recipe_path, details=details)


# -- the backends' shared shape ---------------------------------------------------------------


class LlmcBackend:
    """What GPTQ, AWQ and RTN share: validation, group sizes, the compressed-tensors format,
    and loading (QuantLinear for kernel torch/triton, plain transformers for kernel hf)."""

    name = "llmc"

    def validate(self, quant: dict[str, Any]) -> None:
        """One-line ConfigError for a bad ``quant`` value (see ``validate_quant``)."""
        validate_quant(quant)
        if quant.get("method") != self.name:
            raise ConfigError(
                f"quant.method={quant.get('method')!r} given to the {self.name} backend"
            )

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        """Raises ConfigError for a bad value; returns why it cannot run here, or None."""
        self.validate(quant)
        if self.checkpoint_format(quant) == CT_FORMAT:
            return llmcompressor_missing()
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return list(LEGAL_GROUP_SIZES)

    def checkpoint_format(self, quant: dict[str, Any]) -> str:
        """The layout of the checkpoint this backend writes (pad_align picks its mode by it)."""
        return CT_FORMAT

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        return quantize_with_llmc(request)

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        from qpipe.backends.qlinear_loader import load_checkpoint

        return load_checkpoint(checkpoint, model_class, device, dtype, kernel, device_map)
