"""Pipeline DAGs, read from YAML: which stages run and what each needs.

```yaml
name: default
stages:
  env_check: {}
  memory_budget: {needs: [env_check]}
  quantize: {needs: [pad_align], cache: [model, quant, calib]}
```
A stage's code is ``qpipe.stages.<name>`` (or ``uses: <module>``). ``cache`` names the config
sections that decide the stage's result (the stage must be a function of them alone): the
runner reuses a finished result when they are unchanged.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qpipe.config import PIPELINES_DIR
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
    if module not in known_stages():
        raise PipelineError(
            f"stage {name!r} uses unknown stage code {module!r}; known: {', '.join(known_stages())}"
        )
    return StageSpec(
        name=name,
        module=f"qpipe.stages.{module}",
        needs=tuple(raw.get("needs") or ()),
        cache=tuple(raw.get("cache") or ()),
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


def load_dag(name_or_path: str) -> Dag:
    """A DAG by name (``qpipe/pipelines/<name>.yaml``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PIPELINES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))
        raise PipelineError(
            f"pipeline.dag={name_or_path!r} not found; built-in: {', '.join(valid)} (or a path)"
        )
    return parse_dag(yaml.safe_load(path.read_text()), source=path.name)


def stage_function(spec: StageSpec) -> Any:
    return importlib.import_module(spec.module).run
