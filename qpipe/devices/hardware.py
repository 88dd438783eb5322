"""The cards a run plans for: how many, how much memory each, the cap per card, and how much
host memory may take the overflow (``hardware.*`` and ``placement.*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig

from qpipe.errors import ConfigError

DEVICE_MAPS = ("auto", "single", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Cards:
    """The GPUs of a plan, in device order. ``capacity_gb`` is each card's memory;
    ``usable_gb`` what the plan may fill (headroom taken off, then the cap applied)."""

    capacity_gb: list[float]
    usable_gb: list[float]
    offload_gb: float
    capped: bool

    @property
    def count(self) -> int:
        return len(self.capacity_gb)

    @property
    def several(self) -> bool:
        """Whether the plan is more than "one card, nothing else" (a device map is worth
        computing)."""
        return self.count > 1 or self.offload_gb > 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def per_card(value: Any, key: str) -> list[float] | None:
    """A number (every card) or a list (one per card) as a list; None stays None."""
    if value is None:
        return None
    items = list(value) if isinstance(value, list | tuple | ListConfig) else [value]
    if not items or not all(_number(v) and v > 0 for v in items):
        raise ConfigError(f"{key}={value!r} is not valid; use a number of GB > 0 or a list of them")
    return [float(v) for v in items]


def validate_placement(cfg: DictConfig) -> None:
    """One-line ConfigError for a bad ``hardware.count/memory_gb/offload_gb`` or
    ``placement.*`` value, before anything heavy runs."""
    hw = cfg.hardware
    count = hw.get("count", 1)
    if count != "auto" and not (isinstance(count, int) and not isinstance(count, bool)):
        raise ConfigError(f"hardware.count={count!r} is not valid; use a number of GPUs or auto")
    if count != "auto" and count < 1:
        raise ConfigError(f"hardware.count={count} must be ≥ 1 (or auto)")
    memory = per_card(hw.get("memory_gb"), "hardware.memory_gb")
    if memory and len(memory) > 1 and count != "auto" and len(memory) != count:
        raise ConfigError(
            f"hardware.memory_gb lists {len(memory)} cards but hardware.count={count}; "
            "give one value per card or a single value"
        )
    offload = hw.get("offload_gb", 0) or 0
    if not _number(offload) or offload < 0:
        raise ConfigError(f"hardware.offload_gb={offload!r} is not valid; use a number of GB ≥ 0")
    placement = cfg.get("placement") or {}
    strategy = placement.get("device_map", "auto")
    if strategy not in DEVICE_MAPS:
        raise ConfigError(
            f"placement.device_map={strategy!r} is not valid; use one of: {', '.join(DEVICE_MAPS)}"
        )
    per_card(placement.get("max_memory_gb"), "placement.max_memory_gb")
    per_job = placement.get("gpus_per_job", 1)
    if not isinstance(per_job, int) or isinstance(per_job, bool) or per_job < 0:
        raise ConfigError(
            f"placement.gpus_per_job={per_job!r} is not valid; use a number ≥ 0 (0 = no pinning)"
        )


def _detected_gpus(device: str) -> list[float]:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return []
    if ":" in device:  # one named GPU: the plan is that card
        index = int(device.split(":", 1)[1])
        return [torch.cuda.get_device_properties(index).total_memory / 1e9]
    return [
        torch.cuda.get_device_properties(i).total_memory / 1e9
        for i in range(torch.cuda.device_count())
    ]


def resolve_cards(cfg: DictConfig, device: str, detected_gb: float | None) -> Cards:
    """The cards to plan for. ``device`` is where the run executes ("cuda", "cuda:1", "cpu");
    ``detected_gb`` the memory env_check found (the GPU's, or the host's on CPU)."""
    hw = cfg.hardware
    count = hw.get("count", 1)
    memory = per_card(hw.get("memory_gb"), "hardware.memory_gb")
    if memory is None:
        memory = _detected_gpus(device) if hw.name == "auto" else []
        if not memory:  # CPU, or a GPU env_check saw and torch can't list here
            memory = [float(detected_gb)] if detected_gb is not None else []
        if count != "auto":
            memory = memory[:count] if len(memory) >= count else memory[:1] * count
    elif len(memory) == 1:
        memory = memory * (1 if count == "auto" else int(count))
    headroom = 1 - float(hw.headroom_pct) / 100
    usable = [m * headroom for m in memory]
    caps = per_card((cfg.get("placement") or {}).get("max_memory_gb"), "placement.max_memory_gb")
    if caps:
        caps = caps * len(memory) if len(caps) == 1 else caps
        if len(caps) != len(memory):
            raise ConfigError(
                f"placement.max_memory_gb lists {len(caps)} caps for {len(memory)} cards; "
                "give one value per card or a single value"
            )
        usable = [min(u, c) for u, c in zip(usable, caps, strict=True)]
    offload = float(hw.get("offload_gb", 0) or 0)
    return Cards(capacity_gb=memory, usable_gb=usable, offload_gb=offload, capped=bool(caps))
