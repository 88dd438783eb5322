"""The one header every benchmark's result file starts with, and where result files go.

Every file under ``bench/results/`` says what ran (the command), where (the card, its driver
and memory, or the CPU) and with what (library versions), so that a number in the README can
be traced to the machine that gave it. Benchmarks call ``result_header`` once, add their raw
numbers, and ``write_result`` writes ``<what>_<where>.json`` and ``.md`` side by side
(``kernels_h200.json``: the kernel table, on an H200), each file written whole or not at all.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

_LIBRARIES = (
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "peft",
    "bitsandbytes",
    "llmcompressor",
    "compressed-tensors",
    "deepspeed",
    "gemlite",
    "mlflow",
)


def versions() -> dict[str, str]:
    """Versions of the libraries a result may depend on (those installed), and CUDA's."""
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.version.cuda:
            out["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return out


def _nvidia_smi() -> list[dict[str, str]]:
    query = "name,driver_version,memory.total"
    try:
        text = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    keys = query.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
            for line in text.strip().splitlines() if line.strip()]  # fmt: skip


def device() -> dict[str, Any]:
    """The card(s) this process sees, or the CPU when there is none."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        return {"name": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                "count": 0}  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    smi = _nvidia_smi()
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "l2_bytes": int(getattr(props, "L2_cache_size", 0)),
        "memory_gb": round(props.total_memory / 1e9, 2),
        "driver": smi[0]["driver_version"] if smi else "unknown",
    }


def card_slug(dev: dict[str, Any] | None = None) -> str:
    """``h100``, ``h200``, ``a100``, ``cpu``: the short name result files carry."""
    name = (dev or device())["name"].lower()
    if name.startswith("cpu"):
        return "cpu"
    match = re.search(r"\b([a-z]{1,3}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return match.group(1) if match else re.sub(r"\W+", "_", name).strip("_")


def result_header(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """What every result file starts with: the command, date, device and versions."""
    return {
        "command": command or "python " + shlex.join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device(),
        "versions": versions(),
        **extra,
    }


def markdown_heading(title: str, result: dict[str, Any]) -> list[str]:
    """The first lines of every result page: the title with the card, command, versions."""
    dev = result["device"]
    where = dev["name"] + (f" ×{dev['count']}" if dev.get("count", 0) > 1 else "")
    if dev.get("driver"):
        where += f", driver {dev['driver']}"
    return [
        f"# {title} — {dev['name']}",
        "",
        f"`{result['command']}` ({result['date']}; {where})",
        "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_result(
    stem: str, result: dict[str, Any], markdown: list[str] | str, folder: Path | None = None
) -> tuple[Path, Path]:
    """``<folder>/<stem>.json`` (the raw numbers) and ``.md`` (the table people read)."""
    import json

    folder = Path(folder or os.environ.get("OUT") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    js, mdp = folder / f"{stem}.json", folder / f"{stem}.md"
    _write_whole(js, json.dumps(result, indent=2, default=str) + "\n")
    text = markdown if isinstance(markdown, str) else "\n".join(markdown)
    _write_whole(mdp, text.rstrip("\n") + "\n")
    return js, mdp
