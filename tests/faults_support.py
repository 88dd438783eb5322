"""Helpers of the fault-injection suite (tests/test_faults.py): running qpipe with a fault
armed, finding its MLflow run, and the record the suite writes as
bench/results/faults.{json,md} when QPIPE_FAULTS_RESULTS names a folder."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
RESULTS_ENV = "QPIPE_FAULTS_RESULTS"
COMMAND = (
    f"{RESULTS_ENV}=bench/results python -m pytest -q tests/test_faults.py "
    "tests/test_fault_families.py"
)

# Small and fast: random Llama (4 layers, hidden 256), RTN into qpipe's layout, a short eval.
TINY = (
    "model=tiny_llama",
    "quant=rtn",
    "quant.format=qpipe-w4",
    "eval=quick",
    "eval.max_tokens=64",
    "eval.window=64",
    "eval.prefill_tokens=16",
    "eval.max_new_tokens=2",
    "eval.baseline=false",
    "workload.context_len=32",
    "mlflow.experiment=faults",
)

# The default pipeline up to load: what a kill in quantize and the rerun need.
QUANTIZE_LOAD_DAG = """name: quantize_load
stages:
  env_check: {}
  memory_budget: {needs: [env_check]}
  exclude_layers: {needs: [memory_budget]}
  pad_align: {needs: [exclude_layers]}
  quantize:
    needs: [memory_budget, pad_align]
    cache: [model, quant, calib, exclude, pad_align, seed, dtype, device]
  load: {needs: [quantize]}
"""


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def env_for(outputs: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "QPIPE_OUTPUTS": str(outputs),
        "PYTHONPATH": path,
        "COLUMNS": "200",
        "MPLBACKEND": "Agg",
        **extra,
    }


def start_qpipe(
    spec: dict[str, Any] | None, overrides: list[str], env: dict[str, str], **popen: Any
) -> subprocess.Popen:
    """``python -m qpipe overrides`` with the fault ``spec`` armed (tests/fault_driver.py), in
    its own process group (as a shell job is: Ctrl-C goes to the group)."""
    cmd = [sys.executable, str(REPO / "tests" / "fault_driver.py"), json.dumps(spec or {})]
    return subprocess.Popen(
        [*cmd, *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **popen,
    )


def finish(proc: subprocess.Popen, started: float, timeout: float = 600) -> Proc:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # never leave a run going on behind a failed test
        proc.communicate()
        raise
    return Proc(proc.returncode, out, err, time.perf_counter() - started)


def run_qpipe(spec: dict[str, Any] | None, overrides: list[str], env: dict[str, str]) -> Proc:
    started = time.perf_counter()
    return finish(start_qpipe(spec, overrides, env), started)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"qpipe ended before the fault point:\n{out[-3000:]}{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the fault point {path} was not reached in {timeout} s")
        time.sleep(0.1)


def mlflow_run(tracking_uri: str, run_dir: Path):
    """The MLflow run that logged from ``run_dir``."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`qpipe.run_dir` = '{run_dir}'")
    assert len(runs) == 1, f"{len(runs)} runs logged from {run_dir}"
    return runs[0]


def error_lines(text: str) -> list[str]:
    """The lines qpipe prints for a failure (its ✘ / error: / interrupted lines)."""
    marks = ("✘", "error:", "interrupted (", "! MLflow")
    return [line for line in text.splitlines() if line.lstrip().startswith(marks)]


@dataclass
class FaultRecord:
    fault: str
    injected: str  # how the suite made it happen
    outcome: str  # the line the user sees
    final_state: str  # MLflow status (+ failed stage)
    time_to_error_s: float | None
    lost: str  # what was lost, "nothing" when nothing was
    kept: bool  # every promise checked held


# The families of issue 35, in the order faults.md lists them.
FAMILIES = (
    "cache corruption",
    "store faults",
    "colliding runs and sweeps",
    "signals at every stage",
    "launchers and lock waits",
    "hostile YAML",
    "special files and link loops",
)


@dataclass
class FaultLog:
    faults: list[FaultRecord] = field(default_factory=list)
    bad_configs: list[dict[str, Any]] = field(default_factory=list)
    bad_inputs: list[dict[str, Any]] = field(default_factory=list)
    families: list[dict[str, Any]] = field(default_factory=list)
    gpu_note: str = (
        "CUDA out-of-memory needs a GPU: bench/gpu_oom.py writes bench/results/oom_*.json"
    )

    def add(self, **row: Any) -> FaultRecord:
        # Paths of this machine's temp folders say nothing to a reader.
        for key in ("outcome", "final_state"):
            text = re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+", "…", row[key])
            if os.environ.get("QPIPE_OUTPUTS"):
                text = text.replace(os.environ["QPIPE_OUTPUTS"], "outputs")
            row[key] = text
        record = FaultRecord(**row)
        self.faults.append(record)
        return record

    def family(
        self,
        family: str,
        case: str,
        line: str,
        exit: int | None,
        state: str,
        recovered: bool | None = None,
        seconds: float | None = None,
    ) -> None:
        """One case of a family: the one line the user saw, the exit code, the state it left
        and, for a fault qpipe recovers from, whether the next run gave the right result (each
        asserted by the test before it is recorded)."""
        assert family in FAMILIES, family
        for tmp in re.findall(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+", line):
            line = line.replace(tmp, "…")
        if os.environ.get("QPIPE_OUTPUTS"):
            line = line.replace(os.environ["QPIPE_OUTPUTS"], "outputs")
        self.families.append(
            {
                "family": family,
                "case": case,
                "line": line[:400],
                "exit": exit,
                "state": state,
                "recovered": recovered,
                "seconds": None if seconds is None else round(seconds, 2),
            }
        )

    def write(self, folder: Path) -> None:
        import mlflow
        import torch
        import transformers

        folder.mkdir(parents=True, exist_ok=True)
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        counts = {
            "tried": len(self.bad_configs),
            "one_line_error": sum(c["verdict"] == "one-line error" for c in self.bad_configs),
            "multi_line_no_traceback": sum(
                c["verdict"] == "multi-line, no traceback" for c in self.bad_configs
            ),
            "traceback": sum(c["verdict"] == "traceback" for c in self.bad_configs),
            "not_refused": sum(c["verdict"] == "not refused" for c in self.bad_configs),
        }
        data = {
            "command": COMMAND,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "device": f"CPU ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, shared)",
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "mlflow": mlflow.__version__,
                "qpipe_commit": sha,
            },
            "faults": [asdict(r) for r in self.faults],
            "bad_config": {**counts, "cases": self.bad_configs},
            "bad_input": {
                "tried": len(self.bad_inputs),
                "one_line_error": len(self.bad_inputs),  # each asserted: exit ≠ 0, one line
                "before_the_run_opened": sum(
                    c["when"] == "before the run opened" for c in self.bad_inputs
                ),
                "kinds": {
                    kind: sum(c["kind"] == kind for c in self.bad_inputs)
                    for kind in dict.fromkeys(c["kind"] for c in self.bad_inputs)
                },
                "cases": self.bad_inputs,
            },
            "families": {
                name: {
                    "tried": sum(c["family"] == name for c in self.families),
                    "one_line": sum(c["family"] == name for c in self.families),
                    "recoverable": sum(
                        c["family"] == name and c["recovered"] is not None for c in self.families
                    ),
                    "recovered": sum(
                        c["family"] == name and c["recovered"] is True for c in self.families
                    ),
                }
                for name in FAMILIES
            },
            "family_cases": self.families,
            "not_here": self.gpu_note,
        }
        (folder / "faults.json").write_text(json.dumps(data, indent=2) + "\n")
        (folder / "faults.md").write_text(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# What qpipe promises under faults",
        "",
        f"`{data['command']}` — {data['date']}, {data['device']}; "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        "Time to error: from the fault to the line the user sees (for the disk-full run and "
        "the tracking server, from the start of the run, resp. the server's death, to the end "
        "of the run). The CPU was shared with other jobs: times are upper bounds.",
        "",
        "| fault | injected by | what the user sees | final state | time to error | lost | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["faults"]:
        t = "—" if r["time_to_error_s"] is None else f"{r['time_to_error_s']:.1f} s"
        outcome = r["outcome"].replace("|", "\\|")
        lines.append(
            f"| {r['fault']} | {r['injected']} | {outcome} | {r['final_state']} | {t} | "
            f"{r['lost']} | {'yes' if r['kept'] else '**no**'} |"
        )
    bc = data["bad_config"]
    lines += [
        "",
        f"Bad config values: {bc['tried']} tried, {bc['one_line_error']} refused with one line, "
        f"{bc['multi_line_no_traceback']} with Hydra's own multi-line message (no traceback), "
        f"{bc['traceback']} tracebacks, {bc['not_refused']} not refused.",
        "",
        "| overrides | exit | verdict | message |",
        "|---|---|---|---|",
    ]
    for c in bc["cases"]:
        msg = c["message"].replace("|", "\\|")
        lines.append(f"| `{' '.join(c['overrides'])}` | {c['exit']} | {c['verdict']} | {msg} |")
    bi = data.get("bad_input")
    if bi and bi["tried"]:
        kinds = ", ".join(f"{n} {k}" for k, n in bi["kinds"].items())
        lines += [
            "",
            f"Bad inputs (files, paths, URIs, numbers, user code, concurrency): {bi['tried']} "
            f"tried ({kinds}), {bi['one_line_error']} refused with one line, exit ≠ 0 and no "
            f"traceback; {bi['before_the_run_opened']} of them before the run opened, the "
            "others FAILED in the stage that met them.",
            "",
            "| input | kind | overrides | exit | when | message |",
            "|---|---|---|---|---|---|",
        ]
        for c in bi["cases"]:
            msg = c["message"].replace("|", "\\|")
            shown = " ".join(c["overrides"]).replace(str(REPO), ".").replace("|", "\\|")
            lines.append(
                f"| {c['input']} | {c['kind']} | `{shown}` | {c['exit']} | {c['when']} | {msg} |"
            )
    fam = data.get("families")
    if fam and data.get("family_cases"):
        tried = sum(f["tried"] for f in fam.values())
        lines += [
            "",
            f"Fault families (issue 35): {tried} cases, each asserted to end with exit ≠ 0 (or, "
            "for a fault qpipe survives, the right result) and one line naming what is wrong, "
            "no traceback; for a recoverable fault, the next run's result is checked too.",
            "",
            "| family | cases | one line | recoverable | recovered on the next run |",
            "|---|---|---|---|---|",
        ]
        for name, f in fam.items():
            lines.append(
                f"| {name} | {f['tried']} | {f['one_line']} | {f['recoverable']} | "
                f"{f['recovered']} |"
            )
        lines += ["", "| family | case | exit | the one line | state after | next run |"]
        lines += ["|---|---|---|---|---|---|"]
        for c in data["family_cases"]:
            line = c["line"].replace("|", "\\|")
            nxt = {True: "right result", False: "**wrong**", None: "—"}[c["recovered"]]
            code = "—" if c["exit"] is None else c["exit"]  # checked through the API
            lines.append(
                f"| {c['family']} | {c['case']} | {code} | {line} | {c['state']} | {nxt} |"
            )
    lines += ["", data["not_here"], ""]
    return "\n".join(lines)


LOG = FaultLog()  # one record for both fault modules (written when either finishes)
