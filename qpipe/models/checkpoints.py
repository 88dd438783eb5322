"""Open a checkpoint folder and check it before any weight is read: config.json, the shard
index, every safetensors header against its file size, the tensors against the architecture
the config describes, qpipe-w4's layout version, and what the folder would make us run
(custom code, pickled weights). A problem is one line naming the file and what is wrong,
instead of a library's message from whichever stage first touches the folder."""

from __future__ import annotations

import difflib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qpipe.config.safety import LoadPolicy, policy
from qpipe.errors import CheckpointError, UnsafeCheckpoint

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_INT_DTYPES = {"U8", "I8", "U16", "I16", "U32", "I32", "I64", "U64", "BOOL"}
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


CONFIG_LIMIT = 16 * 2**20


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a Hugging Face folder")
    if path.stat().st_size > CONFIG_LIMIT:  # a config.json is kilobytes
        raise CheckpointError(f"{path} holds {path.stat().st_size:,} bytes: not a model config")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}), checked
    against the file's size: a truncated or padded file is found without reading its data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CheckpointError(
                f"{path} is truncated: {size} bytes, its header alone claims {length + 8}"
            )
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt header (not JSON)") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        numel = 1
        for dim in info["shape"]:
            numel *= dim
        if stop - begin != numel * _DTYPE_BYTES.get(info["dtype"], 0) and info["dtype"] in (
            _DTYPE_BYTES
        ):
            raise CheckpointError(f"{path}: tensor {name} has a size that does not fit its shape")
        end = max(end, stop)
    expected = 8 + length + end
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, its header describes {expected} "
            f"({expected - size} bytes missing)"
        )
    if size > expected:
        raise CheckpointError(
            f"{path} has {size - expected} bytes more than its header describes (corrupt)"
        )
    return header


def _weight_files(folder: Path, pol: LoadPolicy) -> list[Path]:
    """The safetensors files the folder's weights are in; the shard index checked."""
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_path} is not a valid shard index") from None
        shards: dict[str, int] = {}
        for shard in weight_map.values():
            shards[shard] = shards.get(shard, 0) + 1
        for shard, count in sorted(shards.items()):
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"{folder / shard} is missing: {INDEX} lists it for {count} tensors"
                )
        return [folder / s for s in sorted(shards)]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not pol.allow_pickle:
        raise UnsafeCheckpoint(
            f"{folder / pickled[0]}: the weights are pickled, and unpickling can run code; "
            "qpipe loads only safetensors unless model.allow_pickle=true (trusted files only)"
        )
    if not pickled:
        raise CheckpointError(f"{folder} holds no weights (no *.safetensors, no {INDEX})")
    return []


def _meta_model(folder: Path, config: dict[str, Any], model_class: str) -> torch.nn.Module:
    import transformers
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=policy().trust_remote_code)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    cls = getattr(transformers, model_class)
    with torch.device("meta"):
        return cls.from_config(hf_config, trust_remote_code=policy().trust_remote_code)


def key_renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """Checkpoint key -> the model's own name. transformers saves some architectures under
    their original checkpoint names (InternVL: ``language_model.model.layers.0...`` for the
    module ``model.language_model.layers.0...``) and renames them on load with its conversion
    mapping; qpipe builds models itself, so it applies the same renamings. Names already in
    the model's form map to themselves."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    meta = dict.fromkeys(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        # Converters (fused or split tensors) do not apply to quantized payloads; only names.
        return rename_source_key(key, renamings, [], prefix, meta)[0]

    return rename


def _owner(name: str, modules: dict[str, torch.nn.Module]) -> tuple[str, str]:
    """The deepest module of the model whose name prefixes ``name``, and the rest."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix, ".".join(parts[i:])
    return "", name


def check_tensors_match(
    folder: Path, config: dict[str, Any], model_class: str, tensors: dict[str, tuple[str, Any]]
) -> None:
    """The tensors against the architecture config.json describes (built on the meta device):
    same shapes where names meet, no module the model lacks, no parameter missing."""
    model = _meta_model(folder, config, model_class)
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    params = dict(model.named_parameters(remove_duplicate=False))
    where = folder / "config.json"

    rename = key_renamer(model)  # InternVL and friends keep their original checkpoint names

    def canonical(key: str) -> str:
        key = rename(key)
        if key in params or key.rsplit(".", 1)[0] in modules:
            return key
        for alt in (f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if alt in params or alt.rsplit(".", 1)[0] in modules:
                return alt
        return key

    seen: set[str] = set()
    for raw, (dtype, shape) in tensors.items():
        key = canonical(raw)
        owner, rest = _owner(key, modules)
        module = modules.get(owner)
        own_params = module is not None and any(True for _ in module.parameters(recurse=False))
        if key in params:
            seen.add(key)
            want = tuple(params[key].shape)
            if dtype not in _INT_DTYPES and tuple(shape) != want:
                raise CheckpointError(
                    f"{where} does not match the tensors: {raw} is {tuple(shape)} in "
                    f"the checkpoint, the config makes it {want}"
                )
        elif not own_params and "." in rest:
            raise CheckpointError(
                f"{where} does not match the tensors: the checkpoint holds {raw}, a module "
                f"the config's architecture does not have"
            )
        else:
            seen.add(owner)  # a quantized module's own tensors (weight_packed, qweight, ...)
    groups: dict[int, list[str]] = {}
    for name, param in params.items():
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        owners = {n.rsplit(".", 1)[0] for n in names}
        if not any(n in seen for n in names) and not owners & seen:
            raise CheckpointError(
                f"{where} does not match the tensors: the config's architecture has "
                f"{names[0]}, the checkpoint has no tensor for it"
            )


def _check_qpipe_w4(folder: Path, config: dict[str, Any]) -> None:
    from qpipe.kernels.layout import LAYOUT_NAME, LAYOUT_VERSION

    qcfg = config.get("quantization_config") or {}
    found = {qcfg.get("layout_version", 1)}
    found |= {m.get("layout_version", 1) for m in (qcfg.get("modules") or {}).values()}
    layouts = {m.get("layout", LAYOUT_NAME) for m in (qcfg.get("modules") or {}).values()}
    readable = set(range(1, LAYOUT_VERSION + 1))  # older versions are converted at load
    if found - readable or layouts - {LAYOUT_NAME}:
        bad = sorted(map(str, found - readable)) or sorted(layouts - {LAYOUT_NAME})
        raise CheckpointError(
            f"{folder / 'config.json'}: {LAYOUT_NAME} layout version {', '.join(bad)}, this qpipe "
            f"reads versions 1 to {LAYOUT_VERSION}; quantize the model again with this qpipe"
        )


_PASSED: set[tuple[Any, ...]] = set()


def _fingerprint(folder: Path, model_class: str) -> tuple[Any, ...]:
    files = tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
    )
    return (str(folder), model_class, policy(), files)


def inspect_checkpoint(folder: Path, model_class: str = "AutoModelForCausalLM") -> None:
    """Raise CheckpointError / UnsafeCheckpoint for a folder that must not be loaded; cheap
    (headers only, the architecture on the meta device), and done once per unchanged folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist or is not a folder")
    key = _fingerprint(folder, model_class)
    if key in _PASSED:
        return
    _inspect(folder, model_class)
    _PASSED.add(key)


def check_model_type(folder: Path, config: dict[str, Any]) -> None:
    """The architecture must be one this transformers builds (a folder's own code, auto_map,
    was refused or allowed above)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if config.get("auto_map") or model_type in CONFIG_MAPPING_NAMES:
        return
    path = folder / "config.json"
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(
            f"{path} has no model_type: transformers cannot tell the architecture (add e.g. "
            '"model_type": "llama")'
        )
    close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise CheckpointError(
        f"{path}: model_type {model_type!r} is not an architecture transformers "
        f"{transformers.__version__} knows{hint}; fix config.json, or use a transformers that "
        "has it"
    )


def _inspect(folder: Path, model_class: str) -> None:
    pol = policy()
    config = read_config(folder)
    if config.get("auto_map") and not pol.trust_remote_code:
        raise UnsafeCheckpoint(
            f"{folder / 'config.json'} asks to run the folder's own code (auto_map: "
            f"{', '.join(sorted(config['auto_map']))}); qpipe runs no code from checkpoints "
            "unless model.trust_remote_code=true"
        )
    check_model_type(folder, config)
    if (config.get("quantization_config") or {}).get("quant_method") == "qpipe-w4":
        _check_qpipe_w4(folder, config)
    tensors: dict[str, tuple[str, Any]] = {}
    for file in _weight_files(folder, pol):
        for name, info in safetensors_header(file).items():
            tensors[name] = (info["dtype"], info["shape"])
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        for name, shard in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{folder / shard} lacks {name}, which {INDEX} places there")
    if tensors:
        check_tensors_match(folder, config, model_class, tensors)
