"""Where a CPU run's resident-set growth goes beyond the tensors the estimate prices: one fresh
process per (checkpoint, glibc setting), SmolLM2's validate_vram workload (a prompt of 2044
tokens and 4 greedy steps), measured three ways at once.

    python bench/host_rss_breakdown.py [--quants none bnb_nf4 rtn] [--out bench/results]

Each row loads the checkpoint the pipeline made (``+quant=Q pipeline=fit`` must have run on
this outputs folder), then runs the workload and reports: the resident set's growth from
before loading to the running peak (VmHWM, reset after loading, as validate_vram does), the
model's tensors plus the run's PyTorch CPU allocator peak (qpipe's CPU measure), and the
growth of the resident set per mapping from ``/proc/self/smaps`` (heap, anonymous, the
checkpoint's files, shared libraries). ``glibc``: ``default`` (its mmap threshold rises to
each freed block, up to 32 MB) or ``fixed`` (1 MB, what qpipe sets for a run).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, re, sys
from pathlib import Path
import torch
import qpipe.devices.measure as M
from qpipe.backends import get_backend
from qpipe.config.compose import load_model_group
from qpipe.corpora.texts import read_text, token_ids
from qpipe.models import load_tokenizer
from qpipe.stages.load import _first_forward
from qpipe.stages.validate_vram import PEAK_DECODE_STEPS, generate_to_context

checkpoint, method, glibc = sys.argv[1], sys.argv[2], sys.argv[3]

def smaps():
    out, name = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            out[name] = out.get(name, 0) + int(line.split()[1]) * 1024
    return out

def kind(name):
    if name in ("[heap]", "[anon]"):
        return name.strip("[]")
    if ".so" in name:
        return "libraries"
    if name.endswith(".safetensors"):
        return "checkpoint files"
    return "other"

if glibc == "default":
    M._HOST_FREES_SET = True  # leave glibc's dynamic threshold as it is
tokenizer = load_tokenizer(load_model_group("smollm2"))
window = M.MemoryWindow("cpu").start()
before = smaps()
model = get_backend(method).load(Path(checkpoint), "AutoModelForCausalLM", "cpu", torch.float32, "torch")
_first_forward(model)
window.split_host_peak()
window.track_tensors(model)
ids = token_ids(tokenizer, read_text("eval_gpl3.txt"), 2048 - PEAK_DECODE_STEPS).view(1, -1)
generate_to_context(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, PEAK_DECODE_STEPS)
window.read()
window.close()
after = smaps()
by_kind = {}
for name in set(before) | set(after):
    k = kind(name)
    by_kind[k] = by_kind.get(k, 0) + after.get(name, 0) - before.get(name, 0)
print("RESULT " + json.dumps({
    "rss_growth_gb": window.growth_gb,
    "tensors_gb": window.used_gb,
    "model_tensors_gb": window.tensors_base / 1e9,
    "smaps_growth_at_end_gb": {k: round(v / 1e9, 4) for k, v in sorted(by_kind.items())},
}))
"""


def checkpoint_of(quant: str, outputs: Path) -> tuple[Path, str]:
    """The newest cached checkpoint of ``quant`` under ``outputs`` and its backend (``none``:
    the dequantized SmolLM2 folder itself)."""
    if quant == "none":
        from qpipe.config.compose import load_model_group
        from qpipe.models import materialize

        return materialize(load_model_group("smollm2")), "none"
    found = []
    for record in (outputs / "cache" / "stages" / "quantize").glob("*/result.json"):
        data = json.loads(record.read_text())
        name = data["params"].get("quant.method")
        fmt = str(data["outputs"].get("format"))
        label = {"bitsandbytes-nf4": "bnb_nf4", "bitsandbytes-int8": "bnb_int8"}.get(fmt, name)
        if label == quant:
            found.append((record.stat().st_mtime, Path(data["outputs"]["checkpoint"]), name))
    if not found:
        raise SystemExit(f"no {quant} checkpoint under {outputs}: run +quant={quant} first")
    _, path, method = max(found)
    return path, method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quants", nargs="+", default=["none", "bnb_nf4", "rtn"])
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    opts = parser.parse_args()
    import os

    outputs = Path(os.environ.get("QPIPE_OUTPUTS", "outputs")).resolve()
    rows = []
    for quant in opts.quants:
        checkpoint, method = checkpoint_of(quant, outputs)
        for glibc in ("default", "fixed"):
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(checkpoint), method, glibc],
                capture_output=True, text=True, cwd=ROOT, timeout=1800,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            found = re.findall(r"^RESULT (.*)$", proc.stdout, re.M)
            row = {"quant": quant, "glibc": glibc, **(json.loads(found[-1]) if found else {})}
            if not found:
                row["error"] = proc.stderr[-1500:]
            rows.append(row)
            print(row, flush=True)
    result = harness.result_header(rows=rows)
    md = harness.markdown_heading("Host memory of a CPU run: resident set against tensors", result)
    md += [
        "SmolLM2-135M checkpoints made by the pipeline, fp32, validate_vram's workload (prompt"
        " 2044 tokens + 4 greedy steps). *RSS growth*: VmHWM from before loading, reset after"
        " loading. *Tensors*: the model's tensors + the run's PyTorch CPU allocator peak (qpipe's"
        " CPU measure). *smaps growth*: the resident set per kind of mapping, end of run minus"
        " before loading. glibc *default*: its mmap threshold rises to each freed block;"
        " *fixed*: 1 MB (what qpipe sets).",
        "",
        "| quant | glibc | RSS growth GB | tensors GB | heap | anon | checkpoint files |"
        " libraries | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r.get("smaps_growth_at_end_gb", {})
        cells = [r["quant"], r["glibc"]]
        cells += [f"{r[k]:.3f}" if k in r else "—" for k in ("rss_growth_gb", "tensors_gb")]
        cells += [f"{g.get(k, 0):.3f}" for k in ("heap", "anon", "checkpoint files", "libraries",
                                                 "other")]  # fmt: skip
        md.append("| " + " | ".join(cells) + " |")
    harness.write_result("host_rss_smollm2_cpu", result, md, opts.out)


if __name__ == "__main__":
    main()
