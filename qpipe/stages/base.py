"""The stage contract: what a stage receives and what it gives back.

A stage is a function ``run(ctx: StageContext) -> StageResult``. It reads the run's settings
(``ctx.settings``), the config and the results of the stages it needs; it never talks to MLflow
or the cache (the runner does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qpipe.config.settings import Settings, resolve_settings


@dataclass
class StageResult:
    """What a stage hands forward.

    outputs: plain JSON-serialisable data, logged as ``<stage>.json`` and given to dependents.
      An ``estimate`` among them (a memory estimate: ``peak_gb``, ``weights_gb``...) is what
      the runner quotes when a later stage runs out of memory.
    metrics: numbers with the stable names of DESIGN.md (``mem.est_peak_gb``...).
    params: strings logged once per run (``quant.method``...).
    artifacts: files the stage wrote that belong in MLflow (plots, recipes, samples).
    objects: live in-memory handles (a loaded model, a tokenizer) passed to dependents only;
      never logged, never cached.
    on_run_end: what the runner calls when the run ends, finished or not, once dependents are
      done with ``objects`` (a memory window the stage opened for its dependents to read).
    stop: set when the stage finished its measurement but the pipeline must not go on (a
      budget that cannot fit): the runner logs the result, then fails the run with this text.
    """

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    objects: dict[str, Any] = field(default_factory=dict)
    on_run_end: list[Callable[[], Any]] = field(default_factory=list)
    stop: str | None = None
    cacheable: bool = True  # False: a stage with ``cache:`` that had nothing to do (skipped)


class StageContext:
    """What the runner gives a stage.

    cfg: the whole resolved config (read-only by convention).
    settings: the same config resolved once before the run opened (device, dtype, kernel,
      model class, the quant method's options): what stages read instead of re-deriving it.
    inputs: for each stage named in ``needs`` (transitively), its StageResult.
    workdir: a folder of this stage's own, where it writes checkpoints and artifacts.
    """

    def __init__(
        self,
        cfg: DictConfig,
        inputs: dict[str, StageResult],
        workdir: Path,
        settings: Settings | None = None,
    ) -> None:
        self.cfg = cfg
        self.inputs = inputs
        self.workdir = workdir
        self._settings = settings

    @property
    def settings(self) -> Settings:
        # A stage called on its own (a test, a notebook) gets them resolved from cfg.
        if self._settings is None:
            from qpipe.backends import get_backend

            self._settings = resolve_settings(self.cfg, get_backend, stage_keys=set(self.cfg))
        return self._settings

    def output(self, stage: str, key: str, default: Any = None) -> Any:
        """A value from an upstream stage's outputs (``default`` when that stage did not run)."""
        result = self.inputs.get(stage)
        if result is None:
            return default
        return result.outputs.get(key, default)

    def obj(self, stage: str, key: str) -> Any:
        """A live object handed forward by an upstream stage (a model, a tokenizer)."""
        return self.inputs[stage].objects[key]
