"""Load quantized checkpoints into a model whose quantized Linear layers are qpipe
``QuantLinear``s (4-bit) or ``IntLinear``s (2-, 3- and 8-bit, torch reference).

One path for every format: build the model empty (parameters on the meta device, from the
checkpoint's config), turn each quantized module's tensors into exact ``IntWeights`` with a
format-specific extractor, wrap them in ``QuantLinear`` (kernel "torch" or "triton"), and
assign the remaining tensors (embeddings, norms, lm_head) as they are. Formats:

- ``compressed-tensors`` (what llm-compressor writes; also loadable by plain transformers with
  kernel="hf", which decompresses to nn.Linear),
- ``qpipe-w4`` (qpipe's own layout: QuantLinear buffers, K may be zero-padded),
- ``gptq`` / ``awq`` (AutoGPTQ / AutoAWQ folders, see ``qpipe.backends.legacy``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig

from qpipe.backends.legacy import legacy_extractor
from qpipe.config.safety import trust_remote_code
from qpipe.errors import BackendUnavailable, ConfigError
from qpipe.kernels import IntWeights, QuantLinear, from_compressed_tensors, kernel_available
from qpipe.kernels.formats import Extractor
from qpipe.kernels.int8_linear import Int8Linear
from qpipe.kernels.int_linear import IntLinear
from qpipe.models.checkpoints import key_renamer

QPIPE_W4 = "qpipe-w4"


def quantization_config(checkpoint: Path) -> dict[str, Any]:
    """``quantization_config`` of the checkpoint's config.json ({} when it has none)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return dict(config.get("quantization_config") or {})


def checkpoint_method(checkpoint: Path) -> str | None:
    """The checkpoint's ``quant_method`` (compressed-tensors, gptq, awq, qpipe-w4) or None."""
    return quantization_config(checkpoint).get("quant_method")


def auto_class(model_class: str) -> type:
    cls = getattr(transformers, model_class, None)
    if cls is None or not model_class.startswith("AutoModel"):
        raise ConfigError(f"model_class={model_class!r} is not a transformers auto class")
    return cls


def load_checkpoint(
    checkpoint: Path,
    model_class: str,
    device: str,
    dtype: torch.dtype,
    kernel: str,
    device_map: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Load any 4-bit checkpoint qpipe knows onto ``device``; ``kernel`` "hf" means plain
    transformers (compressed-tensors only), "torch"/"triton" mean QuantLinear. A
    ``device_map`` (several devices) is for kernel=hf only: transformers dispatches it."""
    checkpoint = Path(checkpoint)
    method = checkpoint_method(checkpoint)
    if kernel == "hf":
        if method != "compressed-tensors":
            raise ConfigError(
                f"kernel=hf cannot load a {method} checkpoint (transformers needs the "
                f"original library for it); use kernel=torch or kernel=triton"
            )
        cls = auto_class(model_class)
        remote = trust_remote_code()
        if device_map:
            return cls.from_pretrained(
                checkpoint, dtype=dtype, device_map=device_map, trust_remote_code=remote
            ).eval()
        model = cls.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=remote)
        return model.to(device).eval()
    if device_map:
        raise ConfigError(
            f"kernel={kernel} places a model on one device; use kernel=hf to spread it over "
            "several devices"
        )
    reason = kernel_available(kernel)
    if reason:
        raise BackendUnavailable(reason)
    if method == "compressed-tensors":
        extractors = compressed_tensors_extractors(checkpoint, model_class)
    elif method == QPIPE_W4:
        return _load_qpipe_w4(checkpoint, model_class, device, dtype, kernel)
    elif method in ("gptq", "awq"):
        extractors = legacy_extractor(quantization_config(checkpoint))
    else:
        raise ConfigError(
            f"{checkpoint} is not a quantized checkpoint qpipe can load "
            f"(quant_method={method!r}; known: compressed-tensors, {QPIPE_W4}, gptq, awq)"
        )
    return load_with_extractor(checkpoint, model_class, device, dtype, kernel, extractors)


# -- the shared machinery ----------------------------------------------------------------


def empty_model(checkpoint: Path, model_class: str, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's architecture with parameters on the meta device (buffers such as
    rotary frequencies stay real: they are computed, not loaded)."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code())
    # The quantization is ours to apply: transformers must build plain Linear layers.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = auto_class(model_class).from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code()
        )
    gen = Path(checkpoint) / "generation_config.json"
    if gen.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    return model


def module_renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """``key_renamer`` for module names (``lm_head``, ``language_model.model.layers.0.mlp``)."""
    rename = key_renamer(model)
    return lambda name: rename(name + ".weight").removesuffix(".weight")


def read_tensors(checkpoint: Path, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files, on CPU; keyed by ``model``'s own
    names when a model is given (see ``key_renamer``)."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{checkpoint} holds no .safetensors files")
    rename = key_renamer(model) if model is not None else (lambda key: key)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[rename(key)] = f.get_tensor(key)
    return tensors


def _modules_with(tensors: dict[str, torch.Tensor], suffix: str) -> Iterator[str]:
    for key in list(tensors):
        if key.endswith("." + suffix):
            yield key[: -len(suffix) - 1]


def take_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop every tensor ``prefix.<leaf>`` (one level: the module's own tensors)."""
    keys = [k for k in tensors if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1 :]]
    return {k[len(prefix) + 1 :]: tensors.pop(k) for k in keys}


def load_with_extractor(
    checkpoint: Path,
    model_class: str,
    device: str,
    dtype: torch.dtype,
    kernel: str,
    extractors: tuple[str, Extractor],
) -> torch.nn.Module:
    """Build the model empty, replace each module that has a ``marker`` tensor (e.g.
    ``weight_packed``) by a QuantLinear from ``extract``, assign the rest, move to device."""
    marker, extract = extractors
    model = empty_model(checkpoint, model_class, dtype)
    tensors = read_tensors(checkpoint, model)
    names = list(_modules_with(tensors, marker))
    if not names:
        raise ConfigError(f"{checkpoint}: no quantized modules (no '*.{marker}' tensors)")
    for name in names:
        module = model.get_submodule(name)
        own = {k: v.to(_convert_on(module, device)) for k, v in take_tensors(tensors, name).items()}
        bias = own.pop("bias", None)
        iw = extract(name, own, module)
        expected = (module.out_features, module.in_features)
        if iw.shape[0] != expected[0] or iw.shape[1] < expected[1]:
            raise ConfigError(
                f"{checkpoint}: {name} holds a {tuple(iw.shape)} weight, the model expects "
                f"{expected}"
            )
        model.set_submodule(name, _quantized_module(iw, bias, kernel, dtype, expected[1], name))
    assign_rest(model, tensors, dtype, checkpoint)
    return model.to(device).eval()


def _convert_on(module: torch.nn.Module, device: str) -> str:
    """Where a module's weights are unpacked and repacked: on the GPU that takes seconds for an
    8B model (the host's cores take minutes), except for matrices as large as a 150k-word
    lm_head, whose ~2 GB of transient copies would exceed what the budget leaves for loading."""
    if not str(device).startswith("cuda"):
        return "cpu"
    return "cpu" if module.in_features * module.out_features > 1 << 27 else device


def _quantized_module(
    iw: IntWeights,
    bias: torch.Tensor | None,
    kernel: str,
    dtype: torch.dtype,
    in_features: int,
    name: str,
) -> torch.nn.Module:
    """QuantLinear for 4-bit weights (torch or Triton kernel); IntLinear (torch reference,
    weights kept packed at their width) for the other widths; Int8Linear for 8-bit layers that
    run beside Triton 4-bit ones."""
    if iw.bits == 4:
        return QuantLinear.from_int(iw, bias, kernel=kernel, dtype=dtype, in_features=in_features)
    if iw.bits == 8 and kernel != "torch" and in_features == iw.shape[1]:
        # 8-bit layers beside Triton 4-bit ones (a quant=auto plan on the GPU)
        return Int8Linear(iw, bias, dtype)
    if kernel != "torch":
        raise ConfigError(
            f"{name} holds {iw.bits}-bit weights: kernel={kernel} runs 4-bit weights only; "
            "use kernel=torch (or auto) or kernel=hf"
        )
    return IntLinear.from_int(iw, bias, dtype=dtype, in_features=in_features)


def assign_rest(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: Path
) -> None:
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConfigError(f"{where}: tensors the model does not have: {result.unexpected_keys[:3]}")
    # Tied heads are saved once (as the embedding): tying re-points lm_head at it.
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ConfigError(f"{where}: the checkpoint lacks weights for {meta[:3]}")


# -- compressed-tensors ------------------------------------------------------------------


def _ct_schemes(checkpoint: Path, model_class: str) -> dict[str, dict[str, Any]]:
    """{module name: weights args} from the checkpoint's config groups, matched against the
    model's modules by compressed-tensors itself (targets may be class names or regexes)."""
    from compressed_tensors.utils import match_named_modules

    qcfg = quantization_config(checkpoint)
    fmt = qcfg.get("format")
    if fmt not in ("pack-quantized", None):
        raise ConfigError(
            f"{checkpoint}: compressed-tensors format {fmt!r} is not 4-bit pack-quantized; "
            "load it with kernel=hf"
        )
    model = empty_model(checkpoint, model_class, torch.float32)
    rename = module_renamer(model)

    def model_names(items: list[str]) -> list[str]:
        # Exact module names were saved under checkpoint names too; class names ("Linear")
        # and regexes ("re:...") match the model as they are.
        return [i if i.startswith("re:") or "." not in i else rename(i) for i in items]

    ignore = model_names(list(qcfg.get("ignore") or []))
    schemes: dict[str, dict[str, Any]] = {}
    for group in (qcfg.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        targets = model_names(list(group.get("targets") or []))
        for name, _ in match_named_modules(model, targets, ignore):
            schemes[name] = weights
    return schemes


def compressed_tensors_extractors(checkpoint: Path, model_class: str) -> tuple[str, Extractor]:
    schemes = _ct_schemes(checkpoint, model_class)

    def extract(name: str, own: dict[str, torch.Tensor], module: torch.nn.Module) -> IntWeights:
        args = schemes.get(name)
        if args is None:
            raise ConfigError(f"{checkpoint}: {name} is packed but no config group targets it")
        bits = int(args.get("num_bits", 4))
        if args.get("type", "int") != "int":
            raise ConfigError(
                f"{name} is {bits}-bit {args.get('type')}: qpipe loads integer weights only; "
                "load this checkpoint with kernel=hf"
            )
        k = int(own["weight_shape"][1])
        words = own["weight_packed"].shape[-1]
        if words != math.ceil(k * bits / 32):
            raise ConfigError(
                f"{checkpoint}: {name} holds {words} packed words a row, not the "
                f"{math.ceil(k * bits / 32)} of {bits}-bit weights with K={k} that its config "
                "group says: config.json's config_groups do not match the tensors"
            )
        strategy = args.get("strategy")
        group_size = int(args.get("group_size") or 0) if strategy == "group" else k
        return from_compressed_tensors(
            own["weight_packed"],
            own["weight_scale"],
            own.get("weight_zero_point"),
            own.get("weight_g_idx"),
            weight_shape=own["weight_shape"],
            group_size=group_size,
            bits=bits,
            symmetric=bool(args.get("symmetric", True)),
        )

    return "weight_packed", extract


# -- qpipe-w4 ------------------------------------------------------------------------------


def save_qpipe_w4(model: torch.nn.Module, out: Path, extra: dict[str, Any]) -> None:
    """Save a model whose quantized layers are QuantLinear: safetensors of every tensor
    (QuantLinear buffers included) + config.json whose quantization_config lists each
    QuantLinear's config. transformers refuses the unknown quant_method, which is what we
    want: without qpipe it would silently load random Linear weights."""
    modules = {n: m.config() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    model.save_pretrained(out)
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": QPIPE_W4, **extra, "modules": modules}
    path.write_text(json.dumps(config, indent=2) + "\n")


def _load_qpipe_w4(
    checkpoint: Path, model_class: str, device: str, dtype: torch.dtype, kernel: str
) -> torch.nn.Module:
    modules = quantization_config(checkpoint).get("modules") or {}
    model = empty_model(checkpoint, model_class, dtype)
    rename = module_renamer(model)
    for name, cfg in modules.items():
        q = QuantLinear.from_config(cfg, kernel=kernel, device="cpu")
        model.set_submodule(rename(name), q)
    tensors = read_tensors(checkpoint, model)
    # QuantLinear keeps integer buffers as they are and its scales in the run's dtype.
    assign_rest(model, tensors, dtype, checkpoint)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.to(dtype)
    return model.to(device).eval()
