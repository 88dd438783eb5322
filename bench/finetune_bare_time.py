"""How long the README's first fine-tuning command takes: `python -m qpipe pipeline=finetune`
(SmolLM2's real weights, LoRA, offline), in a fresh outputs folder (the GGUF dequantized and the
MLflow store made on the way) and again with them there, at normal priority and at `nice -n -19`
(on a shared machine the other processes' load is in the first number, less so in the second).

    python bench/finetune_bare_time.py [--out bench/results] [--nice]

Writes finetune_bare_<where>.{json,md}: each run's wall time, exit code, load average before
and after, and the train stage's line (what ran, the loss, est vs measured).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import card_slug, markdown_heading, result_header, write_result  # noqa: E402

COMMAND = [sys.executable, "-m", "qpipe", "pipeline=finetune"]


def timed(outputs: Path, nice: bool, label: str) -> dict:
    env = {**os.environ, "QPIPE_OUTPUTS": str(outputs), "COLUMNS": "400"}
    cmd = (["nice", "-n", "-19"] if nice else []) + COMMAND
    before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=outputs)
    seconds = time.perf_counter() - start
    text = " ".join((proc.stdout + proc.stderr).split())
    train = re.search(r"train: (.*?) MLflow run", text)
    return {
        "command": " ".join(["nice -n -19"] * nice + ["python -m qpipe pipeline=finetune"]),
        "outputs": label,
        "seconds": round(seconds, 1),
        "exit": proc.returncode,
        "load_before": before,
        "load_after": os.getloadavg(),
        "train": train.group(1) if train else text[-800:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--nice", action="store_true", help="also time at nice -n -19")
    ns = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="qpipe-bare-") as folder:
        outputs = Path(folder)
        for nice in [False] + [True] * ns.nice:
            fresh = outputs / ("nice" if nice else "plain")
            fresh.mkdir()
            for label in ("fresh", "reused"):  # a new outputs folder, then the same again
                runs.append(timed(fresh, nice, label))
                print(runs[-1], flush=True)
    result = {**result_header(), "runs": runs}
    lines = markdown_heading("The bare `pipeline=finetune` on CPU: wall time", result)
    lines += ["| command | outputs folder | wall s | exit | load avg before → after | train |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        load = f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}"
        lines.append(f"| `{r['command']}` | {r['outputs']} | {r['seconds']} | {r['exit']} | "
                     f"{load} | {r['train']} |")  # fmt: skip
    lines += ["", "fresh: the first run in an outputs folder (SmolLM2's GGUF dequantized, MLflow's "
              "store made); reused: the same command again. The machine is shared: the load "
              "average is everyone's."]  # fmt: skip
    print(*write_result(f"finetune_bare_{card_slug(result['device'])}", result, lines, Path(ns.out)),
          sep="\n")  # fmt: skip


if __name__ == "__main__":
    main()
