"""Config helpers: where the Hydra configs live, the users' ``+group=`` form, and the few
values that are decided from the machine (``auto``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qpipe.errors import ConfigError

CONF_DIR = Path(__file__).parents[1] / "conf"
PIPELINES_DIR = Path(__file__).parents[1] / "pipelines"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def defaulted_groups() -> set[str]:
    """Config groups that the primary config's defaults list already selects."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    return {next(iter(item)) for item in defaults if isinstance(item, DictConfig)}


_APPEND = re.compile(r"^\+(?P<group>[\w/]+)=")


def normalize_overrides(args: list[str]) -> list[str]:
    """Let ``+model=X`` mean ``model=X`` for groups that have a default.

    Users write ``+model=internvl +quant=awq`` (the form in many READMEs). Hydra reserves
    ``+group=`` for groups *absent* from the defaults list and rejects it otherwise; giving
    ``model`` and ``quant`` defaults is what lets plain ``python -m qpipe`` run. Both forms
    are wanted, so the append form is rewritten to an override for exactly those groups;
    ``+`` on anything else (new keys) keeps Hydra's meaning.
    """
    # ``pipeline`` is a plain key naming one YAML file; its ``+`` form is accepted the same way.
    groups = defaulted_groups() | {"pipeline"}
    out = []
    for arg in args:
        match = _APPEND.match(arg)
        if match and match["group"] in groups:
            arg = arg[1:]
        out.append(arg)
    return _force_keys_of_swept_groups(_force_schema_keys(out, groups), groups)


def _force_schema_keys(args: list[str], groups: set[str]) -> list[str]:
    """``model=tiny_llama model.path=/my/copy``: a setting the schema knows (qpipe/config/schema.py)
    that the chosen option's YAML leaves out is set all the same (``++``), instead of Hydra's
    "Key 'path' is not in struct"; a key the schema lacks keeps Hydra's meaning (and its
    error), keys the option has stay as written, and the typed schema checks every value."""
    from qpipe.config.schema import schema_leaf

    chosen = {}
    for arg in args:
        m = _ASSIGN.match(arg)
        if m and m["key"] in groups and not _is_sweep(m["value"]):
            chosen[m["key"]] = m["value"]
    out = []
    for arg in args:
        m = _ASSIGN.match(arg)
        key = m["key"] if m else ""
        group, _, rest = key.partition(".")
        # a quant method's own keys are typed by its backend, which names a misspelt one
        method_key = group == "quant" and "." not in rest
        if rest and group in groups and (schema_leaf(key.split(".")) or method_key):
            option = _option_yaml(group, chosen.get(group))
            if option is not None and OmegaConf.select(option, rest, default=_MISSING) is _MISSING:
                arg = "++" + arg
        out.append(arg)
    return out


_MISSING = object()


def _option_yaml(group: str, name: str | None) -> DictConfig | None:
    """The YAML of one option of a group (the user's ``./conf`` first, then the built-ins;
    the default option when ``name`` is None); None when it cannot be told."""
    if name is None:
        defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
        name = next((d[group] for d in defaults if isinstance(d, DictConfig) and group in d), None)
    if not name:
        return None
    for folder in (Path.cwd() / "conf", CONF_DIR):
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            from qpipe.config.yaml_limits import read_yaml_text

            text = read_yaml_text(path, f"{group}={name}")  # refused here if hostile
            try:
                return OmegaConf.create(text)
            except Exception:  # Hydra will say what is wrong with the file
                return None
    return None


_ASSIGN = re.compile(r"^(?P<key>[\w/.]+)=(?P<value>.*)$")


def _is_sweep(value: str) -> bool:
    """``a,b`` or ``glob(...)``/``choice(...)``/``range(...)``; commas inside brackets or quotes
    belong to one value (``[1,2]``)."""
    if value.startswith(("glob(", "choice(", "range(")):
        return True
    depth, quote = 0, ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def _force_keys_of_swept_groups(args: list[str], groups: set[str]) -> list[str]:
    """``--multirun model=a,b model.tokenizer=qwen``: Hydra first composes the sweep with the
    group's *default* option, where ``model.tokenizer`` may not exist, and stops there. ``++``
    sets the key wherever it is missing; each job's config is still checked against the typed
    schema, so a misspelt key is refused there."""
    swept = set()
    for arg in args:
        m = _ASSIGN.match(arg)
        if m and m["key"] in groups and _is_sweep(m["value"]):
            swept.add(m["key"])
    out = []
    for arg in args:
        m = _ASSIGN.match(arg)
        if m and "." in m["key"] and m["key"].split(".", 1)[0] in swept:
            arg = "++" + arg
        out.append(arg)
    return out


def load_group(group: str, name: str) -> DictConfig:
    """One option of a config group, e.g. ``load_group("model", "smollm2")``."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name!r} is not known; valid: {', '.join(valid)}")
    return OmegaConf.load(path)


def group_options(group: str) -> dict[str, Path]:
    """Every option of a config group as Hydra would find it: the working directory's
    ``conf/<group>/`` first (a file there replaces the built-in of its name), then qpipe's."""
    found: dict[str, Path] = {}
    for folder in (Path.cwd() / "conf" / group, CONF_DIR / group):
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def read_option(path: Path, group: str) -> DictConfig:
    """An option's YAML, checked like every user YAML (size, alias expansion, depth) before
    OmegaConf builds anything from it: a hostile file in ``./conf`` is one line, even one the
    run does not select (the quant registry reads them all)."""
    from qpipe.config.yaml_limits import read_yaml_text

    return OmegaConf.create(read_yaml_text(path, f"{group}={path.stem}"))


def load_model_group(name: str) -> DictConfig:
    return load_group("model", name)


def resolve_device(cfg: DictConfig) -> str:
    """``device: auto`` becomes cuda when there is one, else cpu."""
    device = str(cfg.get("device", "auto"))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no CUDA device; use device=cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r} is not valid; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(cfg: DictConfig, device: str) -> torch.dtype:
    """``dtype: auto`` is bf16 on GPU and fp32 on CPU (CPU half-precision matmuls are slow
    and not what users deploy)."""
    name = str(cfg.get("dtype", "auto"))
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype={name!r} is not valid; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_from_name(name: str, default: torch.dtype) -> torch.dtype:
    """A dtype from its config spelling; ``auto`` gives ``default``."""
    if name in (None, "auto"):
        return default
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not valid; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def decode_batch_sizes(cfg: DictConfig, device: str) -> list[int]:
    """``eval.decode_batch_sizes: auto`` is batch 1 (latency, what one user sees): each batch
    size costs its own compilation (about 35 s on an 8B model), so larger ones (16 is where
    4-bit kernels must still beat dense ones) run when asked for, e.g. ``[1,16]``."""
    value = cfg.eval.get("decode_batch_sizes", "auto")
    if value == "auto":
        return [1]
    sizes = list(value) if not isinstance(value, int) else [value]
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(
            f"eval.decode_batch_sizes={value!r} is not valid; use auto or a list of integers ≥ 1"
        )
    return sizes
