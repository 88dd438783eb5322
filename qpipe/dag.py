"""Pipeline DAGs, read from YAML: which stages run and what each needs.

```yaml
name: default
stages:
  env_check: {}
  memory_budget: {needs: [env_check]}
  quantize: {needs: [pad_align], cache: [model, quant, calib]}
```
A stage's code is ``qpipe.stages.<name>``, or ``uses:`` another built-in stage's name or the
dotted path of a user module (``uses: mypkg.stages.my_stage``, importable from the working
directory) with the same contract: ``run(ctx: StageContext) -> StageResult``. ``cache`` names
the config sections that decide the stage's result (the stage must be a function of them
alone): the runner reuses a finished result when they are unchanged.

A pipeline is this one file. ``pipeline=<name>`` finds ``./pipelines/<name>.yaml`` in the working
directory first, then the built-in ``qpipe/pipelines/<name>.yaml``; ``pipeline=path/to/x.yaml``
names a file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qpipe.config.compose import PIPELINES_DIR
from qpipe.config.pathcheck import kind_of
from qpipe.config.yaml_limits import read_yaml_text
from qpipe.errors import ConfigError


class PipelineError(ConfigError):
    """The pipeline YAML is not a valid DAG."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    needs: tuple[str, ...] = ()
    cache: tuple[str, ...] = ()


@dataclass
class Dag:
    name: str
    stages: dict[str, StageSpec] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def upstream(self, stage: str) -> list[str]:
        """Every stage ``stage`` depends on, directly or not, in run order."""
        seen: set[str] = set()
        stack = list(self.stages[stage].needs)
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(self.stages[name].needs)
        return [s for s in self.order if s in seen]


def known_stages() -> list[str]:
    folder = Path(__file__).parent / "stages"
    return sorted(
        p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"
    )


def _spec(name: str, raw: Any) -> StageSpec:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise PipelineError(f"stage {name!r}: expected a mapping (needs/uses/cache), got {raw!r}")
    unknown_keys = set(raw) - {"needs", "uses", "cache"}
    if unknown_keys:
        raise PipelineError(
            f"stage {name!r}: unknown keys {sorted(unknown_keys)}; valid: needs, uses, cache"
        )
    module = raw.get("uses", name)
    if not isinstance(module, str):
        raise PipelineError(f"stage {name!r}: uses must be a stage name or module path")
    if "." in module:
        _check_user_stage(name, module)
    elif module not in known_stages():
        raise PipelineError(
            f"stage {name!r} uses unknown stage code {module!r}; known: "
            f"{', '.join(known_stages())} (or a module path such as mypkg.stages.my_stage)"
        )
    return StageSpec(
        name=name,
        module=module if "." in module else f"qpipe.stages.{module}",
        needs=_names(name, "needs", raw.get("needs"), "stage names"),
        cache=_names(name, "cache", raw.get("cache"), "config keys"),
    )


def _names(stage: str, key: str, value: Any, what: str) -> tuple[str, ...]:
    """A stage's ``needs``/``cache``: a list of names (or one name), nothing nested."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise PipelineError(
            f"stage {stage!r}: {key} must be a list of {what}, e.g. [a, b]; got {value!r}"[:300]
        )
    return tuple(items)


def _check_user_stage(name: str, module: str) -> None:
    """A user stage must import (from the working directory too) and define ``run``."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # the ``qpipe`` script, unlike ``python -m``, does not add it
        sys.path.append(cwd)
    try:
        code = importlib.import_module(module)
    except ImportError as err:
        raise PipelineError(
            f"stage {name!r} uses {module!r}, which cannot be imported ({err}); a user stage "
            "is a module importable from the working directory with run(ctx) -> StageResult"
        ) from None
    except (Exception, SystemExit) as err:  # its own code failed: a syntax error, a raise
        where = ""
        if isinstance(err, SyntaxError) and err.filename:
            where = f" at {err.filename}:{err.lineno}"
        detail = str(err.msg if isinstance(err, SyntaxError) else err).splitlines()
        raise PipelineError(
            f"stage {name!r} uses {module!r}, whose import failed{where}: "
            f"{type(err).__name__}: {detail[0] if detail else ''}; fix the module (a user "
            "stage's import must run without errors)"
        ) from None
    if not callable(getattr(code, "run", None)):
        raise PipelineError(
            f"stage {name!r} uses {module!r}, which has no run(ctx) function; a stage module "
            "defines run(ctx: StageContext) -> StageResult"
        )


def _topological(stages: dict[str, StageSpec]) -> list[str]:
    """Kahn's algorithm, keeping the YAML's order among ready stages (predictable logs)."""
    remaining = {name: set(spec.needs) for name, spec in stages.items()}
    order: list[str] = []
    while remaining:
        ready = [name for name, needs in remaining.items() if not needs]
        if not ready:
            cycle = " → ".join(sorted(remaining))
            raise PipelineError(f"the pipeline has a cycle among: {cycle}")
        for name in ready:
            order.append(name)
            del remaining[name]
        for needs in remaining.values():
            needs.difference_update(ready)
    return order


def parse_dag(data: dict[str, Any], source: str = "<dict>") -> Dag:
    """Validate a DAG description: known stage code, dependencies present, no cycle."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise PipelineError(f"{source}: a pipeline needs a non-empty 'stages' mapping")
    stages = {name: _spec(name, raw) for name, raw in data["stages"].items()}
    for spec in stages.values():
        missing = [n for n in spec.needs if n not in stages]
        if missing:
            raise PipelineError(
                f"stage {spec.name!r} needs {missing} which the pipeline {source} does not "
                f"define; defined: {', '.join(stages)}"
            )
    return Dag(name=data.get("name", source), stages=stages, order=_topological(stages))


def pipeline_dirs() -> list[Path]:
    """Where ``pipeline=<name>`` is looked up, first match wins: the working directory's
    ``pipelines/``, then the built-ins."""
    return [Path.cwd() / "pipelines", PIPELINES_DIR]


def pipeline_ref(cfg: Any) -> str:
    """The pipeline a config names (``pipeline: default``; the older ``pipeline.dag`` form too)."""
    ref = cfg.get("pipeline", "default")
    return str(ref.get("dag") if hasattr(ref, "get") else ref)


def find_pipeline(name_or_path: str) -> Path:
    """The YAML file of a pipeline name or path; a clear error listing the names otherwise."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        found = kind_of(path, "pipeline")
        if found == "a file":
            return path
        raise PipelineError(
            f"pipeline={name_or_path!r}: " + (f"{found}, not a file" if found else "no such file")
        )
    for folder in pipeline_dirs():
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    names = sorted({p.stem for d in pipeline_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise PipelineError(
        f"pipeline={name_or_path!r} not found in ./pipelines or the built-ins; known: "
        f"{', '.join(names)} (or a path to a .yaml file)"
    )


def load_dag(name_or_path: str) -> Dag:
    """A DAG by name (``./pipelines/<name>.yaml``, then ``qpipe/pipelines/<name>.yaml``) or by
    path."""
    path = find_pipeline(name_or_path)
    # Size, alias expansion and depth checked before PyYAML builds anything (yaml_limits).
    text = read_yaml_text(path, f"pipeline={name_or_path!r}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_dag(data, source=path.name)


def stage_function(spec: StageSpec) -> Any:
    return importlib.import_module(spec.module).run
