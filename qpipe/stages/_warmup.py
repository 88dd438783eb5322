"""What the caches under ``outputs/cache`` saved this run: compiling the decode step
(TorchInductor's FX graph and AOTAutograd caches, Triton's kernels) and tuning the 4-bit
kernels (qpipe's tuner), measured, against the same work measured by an earlier run that did
it from nothing.

A run that compiled and tuned from scratch (no compiled graph found, no stored tuning choice
used) records its seconds under ``outputs/cache/warmup/<key>.json``; the key names what that
work depends on (the architecture, the kernel form of the weights, the decode shapes, the
device, the library versions), so another quantizer of the same form (AWQ, then RTN) finds
it. A later run that reused the caches reports ``time.cache_saved_s`` = the cold run's seconds
minus its own, and both figures: nothing is assumed, both were measured.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qpipe.backends import get_backend
from qpipe.config.settings import Settings
from qpipe.devices.envinfo import library_versions
from qpipe.kernels.tuning import TUNER
from qpipe.store.records import read_json, record_path, write_json

KIND = "warmup"


def _counters() -> dict[str, int]:
    """TorchInductor's cache counters so far in this process (zeros before any compile)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - every supported torch has them
        return {}
    inductor, aot = counters.get("inductor", {}), counters.get("aot_autograd", {})
    return {
        "fxgraph_hit": int(inductor.get("fxgraph_cache_hit", 0)),
        "fxgraph_miss": int(inductor.get("fxgraph_cache_miss", 0)),
        "aot_hit": int(aot.get("autograd_cache_hit", 0)),
        "aot_miss": int(aot.get("autograd_cache_miss", 0)),
    }


@dataclass
class Snapshot:
    """The caches' counters and the tuner's figures at one moment."""

    counters: dict[str, int]
    tuned: int
    from_disk: int
    tuning_s: float

    @classmethod
    def now(cls) -> Snapshot:
        stats = TUNER.stats
        return cls(_counters(), stats.tuned, stats.from_disk, stats.seconds)

    def since(self, earlier: Snapshot) -> Snapshot:
        keys = set(self.counters) | set(earlier.counters)
        return Snapshot(
            {k: self.counters.get(k, 0) - earlier.counters.get(k, 0) for k in keys},
            self.tuned - earlier.tuned,
            self.from_disk - earlier.from_disk,
            self.tuning_s - earlier.tuning_s,
        )


def warmup_key(cfg: DictConfig, settings: Settings, device: str) -> str:
    """What compiling the decode step and tuning the kernels depend on (not the weights'
    values: another quantizer of the same kernel form reuses them)."""
    backend = get_backend(settings.quant.method)
    quant = settings.quant.as_dict()
    if backend.runs_on_qpipe_kernel:
        form = {k: quant.get(k) for k in ("bits", "group_size", "symmetric")}
    else:
        form = {"method": quant["method"], "name": quant["name"]}
    ev = cfg.eval
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    versions = library_versions()
    blob = {
        "model": OmegaConf.to_container(cfg.model.get("config") or {}, resolve=True)
        or cfg.model.name,
        "model_class": settings.model_class,
        "form": form,
        "kernel": settings.kernel,
        "dtype": settings.dtype_name,
        "fuse": bool(cfg.get("fuse_projections", True)),
        "decode": [str(ev.decode), str(ev.get("decode_batch_sizes")), int(ev.prefill_tokens)],
        "tokens": [int(ev.max_new_tokens), int(ev.repeats), str(ev.get("image_decode"))],
        "workload": [int(cfg.workload.batch_size), int(cfg.workload.context_len)],
        "device": gpu,
        "versions": {k: versions.get(k) for k in ("torch", "triton", "transformers")},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_metrics(
    delta: Snapshot, compile_s: float, tuning_s: float, key: str, run_dir: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of what this run's warm-up cost and what the caches saved, and a record of it.

    ``delta``: the counters over this run's decode and tuning work; ``compile_s``: its
    compiled decode warm-up; ``tuning_s``: its kernel tuning seconds (validate_vram's and the
    benchmark's)."""
    spent = compile_s + tuning_s
    hits = delta.counters.get("fxgraph_hit", 0) + delta.from_disk
    misses = delta.counters.get("fxgraph_miss", 0) + delta.tuned
    metrics: dict[str, float] = {
        "time.kernel_tuning_s": tuning_s,
        "time.warmup_s": spent,
        "cache.compiled_graphs_reused": float(delta.counters.get("fxgraph_hit", 0)),
        "cache.compiled_graphs_made": float(delta.counters.get("fxgraph_miss", 0)),
        "cache.tuned_shapes_reused": float(delta.from_disk),
        "cache.tuned_shapes_made": float(delta.tuned),
    }
    info: dict[str, Any] = {"key": key, "spent_s": spent, "reused": hits, "made": misses}
    path = record_path(KIND, key)
    if misses and not hits:  # done from nothing: the figure later runs compare with
        write_json(
            path,
            {
                "compile_s": compile_s,
                "kernel_tuning_s": tuning_s,
                "spent_s": spent,
                "run_dir": run_dir,
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            },
        )
        info["cold"] = True
        return metrics, info
    cold = read_json(path)
    if hits and "spent_s" in cold:
        metrics["time.cold_warmup_s"] = float(cold["spent_s"])
        metrics["time.cache_saved_s"] = float(cold["spent_s"]) - spent
        info.update(cold_run=cold.get("run_dir"), cold_date=cold.get("date"))
    return metrics, info
