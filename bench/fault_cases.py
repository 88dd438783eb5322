"""Every case issue 35 reported, run again the way it was found: real ``python -m qpipe``
processes on tiny_llama, a fresh outputs folder per case, real signals, real damaged files.

    python bench/fault_cases.py [--out bench/results] [--only NAME ...]

For each case: the command(s), the exit code, the line the user saw (qpipe's ✘ / error: /
interrupted / ! line, or the warning naming a damaged cache entry), whether a traceback was
printed, and the state it left (MLflow status, what the next run did). Writes
``fault_cases_<where>.{json,md}``. A case is *clear* when it ends with exit ≠ 0, one line
and no traceback — or, for a fault qpipe should survive, with the right result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import card_slug, markdown_heading, result_header, write_result  # noqa: E402

TINY = [
    "model=tiny_llama",
    "quant=rtn",
    "quant.format=qpipe-w4",
    "eval=quick",
    "eval.max_tokens=64",
    "eval.window=64",
    "eval.prefill_tokens=16",
    "eval.max_new_tokens=2",
    "eval.decode=eager",
    "eval.quality_on_random=true",
    "workload.context_len=32",
]
ESTIMATE = ["model=tiny_llama", "pipeline=estimate"]
MARKS = ("✘", "error:", "interrupted (", "! MLflow")


class Case:
    def __init__(self, root: Path, name: str) -> None:
        self.out = root / name
        self.out.mkdir(parents=True)
        self.env = {
            **os.environ,
            "QPIPE_OUTPUTS": str(self.out),
            "PYTHONPATH": str(REPO),
            "COLUMNS": "300",
            "MPLBACKEND": "Agg",
        }

    def start(self, *args: str, spec: dict | None = None, **popen: Any) -> subprocess.Popen:
        cmd = [sys.executable, str(REPO / "tests" / "fault_driver.py"), json.dumps(spec or {})]
        return subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.out,
            start_new_session=True,
            **popen,
        )

    def run(self, *args: str, **kw: Any) -> tuple[int, str]:
        proc = self.start(*args, **kw)
        out, _ = proc.communicate(timeout=900)
        return proc.returncode, out

    def mlflow(self) -> list[dict[str, Any]]:
        from mlflow.entities import ViewType
        from mlflow.tracking import MlflowClient

        db = self.out / "mlflow.db"
        if not db.exists():
            return []
        client = MlflowClient(f"sqlite:///{db}")
        runs = []
        for exp in client.search_experiments():
            for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
                runs.append(
                    {
                        "status": r.info.status,
                        "deleted": r.info.lifecycle_stage == "deleted",
                        "role": r.data.tags.get("qpipe.role", "run"),
                        "failure": r.data.tags.get("qpipe.failure"),
                        "stage": r.data.tags.get("qpipe.failed_stage"),
                        "run_dir": r.data.tags.get("qpipe.run_dir"),
                    }
                )
        return runs


def lines_of(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith(MARKS)]


def damaged_line(text: str) -> str | None:
    found = re.search(r"cached [\w ]+ \S+ is damaged.*?computing it again", " ".join(text.split()))
    return found.group(0) if found else None


def verdict(code: int, text: str, survive: bool = False, ok: bool = True) -> str:
    if "Traceback" in text:
        return "traceback"
    if survive:
        return "clear (recovered)" if code == 0 and ok else "NOT clear"
    return "clear" if code != 0 and len(lines_of(text)) == 1 and ok else "NOT clear"


def _flip_norm(path: Path) -> None:
    """One bit of a norm weight (≈1.0) flipped so that it becomes inf: a NaN perplexity."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        name = next(k for k in header if k.endswith("norm.weight"))
        start, _ = header[name]["data_offsets"]
        f.seek(8 + n + start + 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def case_bitflip(root: Path) -> dict[str, Any]:
    c = Case(root, "bitflip")
    c.run(*TINY)
    (weights,) = (c.out / "cache" / "models").glob("*/model.safetensors")
    _flip_norm(weights)
    shutil.rmtree(c.out / "cache" / "stages" / "baseline")  # the NaN came from here
    code, text = c.run(*TINY)
    again, text2 = c.run(*TINY)
    nan = re.search(r"\bnan\b", text + text2, re.IGNORECASE) is not None
    ok = damaged_line(text) is not None and again == 0 and not nan
    return dict(
        case="a bit flipped in cache/models/<model>/model.safetensors",
        line=damaged_line(text),
        exit=code,
        verdict=verdict(code, text, survive=True, ok=ok),
        state=f"moved aside, rebuilt; FINISHED, no NaN anywhere; the next run exit {again}",
    )


def case_emptied(root: Path) -> dict[str, Any]:
    c = Case(root, "emptied")
    c.run(*TINY)
    (weights,) = (c.out / "cache" / "models").glob("*/model.safetensors")
    weights.write_bytes(b"")
    code, text = c.run(*TINY, "quant.group_size=32")
    return dict(
        case="cache/models/<model>/model.safetensors emptied (a power cut)",
        line=damaged_line(text),
        exit=code,
        verdict=verdict(code, text, survive=True, ok=damaged_line(text) is not None),
        state="moved aside, rebuilt; the run FINISHED",
    )


def case_no_outputs(root: Path) -> dict[str, Any]:
    c = Case(root, "no_outputs")
    c.run(*TINY)
    (record,) = (c.out / "cache" / "stages" / "baseline").glob("*/result.json")
    data = json.loads(record.read_text())
    data.pop("outputs")
    record.write_text(json.dumps(data))
    code, text = c.run(*TINY)
    return dict(
        case="a cached stage's result.json without its outputs",
        line=damaged_line(text),
        exit=code,
        verdict=verdict(code, text, survive=True, ok=damaged_line(text) is not None),
        state="moved aside, recomputed; the run FINISHED",
    )


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.2)


def _ready(marker: Path, at: str, call: int = 1, sleep: float = 20) -> dict[str, Any]:
    return {"at": at, "call": call, "action": "signal_ready", "marker": str(marker), "sleep": sleep}


def case_same_sweep_twice(root: Path) -> dict[str, Any]:
    c = Case(root, "same_sweep")
    sweep = ["--multirun", *TINY, "quant.group_size=32,64", "mlflow.experiment=sw"]
    marker = c.out / "in_job"
    first = c.start(*sweep, spec=_ready(marker, "qpipe.stages.quantize:run", sleep=30))
    _wait_file(marker, first)
    code, text = c.run(*sweep)
    out, _ = first.communicate(timeout=900)
    runs = c.mlflow()
    deleted = sum(r["deleted"] for r in runs)
    ok = deleted == 0 and first.returncode == 0
    return dict(
        case="the same sweep command started twice",
        line=(lines_of(text) or [""])[0],
        exit=code,
        verdict=verdict(code, text, ok=ok),
        state=f"first sweep exit {first.returncode}; runs deleted: {deleted}; "
        f"{sum(r['status'] == 'FINISHED' for r in runs)} FINISHED",
    )


def case_same_sweep_dir(root: Path) -> dict[str, Any]:
    c = Case(root, "same_sweep_dir")
    folder = c.out / "shared"
    marker = c.out / "in_job"
    a = ["--multirun", *TINY, "quant.group_size=32,64", f"hydra.sweep.dir={folder}"]
    b = ["--multirun", *TINY, "quant.group_size=16,128", f"hydra.sweep.dir={folder}"]
    first = c.start(*a, spec=_ready(marker, "qpipe.stages.quantize:run", sleep=20))
    _wait_file(marker, first)
    code, text = c.run(*b)
    first.communicate(timeout=900)
    records = {json.loads(p.read_text())["run_id"] for p in folder.glob("*/run.json")}
    ok = len(records) == 2 and first.returncode == 0
    return dict(
        case="two different sweeps given the same hydra.sweep.dir at once",
        line=(lines_of(text) or [""])[0],
        exit=code,
        verdict=verdict(code, text, ok=ok),
        state=f"the first sweep's 2 jobs kept their own records ({len(records)} run.json)",
    )


def case_same_second(root: Path) -> dict[str, Any]:
    c = Case(root, "same_second")
    procs = [c.start(*ESTIMATE) for _ in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    folders = sorted(p.parent.name for p in (c.out / "runs").glob("*/*/run.json"))
    ok = len(folders) == 2 and codes == [0, 0]
    return dict(
        case="two runs started in the same second, default run folders",
        line="(no line: each has its own folder) " + ", ".join(folders),
        exit=max(codes),
        verdict="clear (recovered)" if ok else "NOT clear",
        state=f"{len(folders)} run folders, {len(c.mlflow())} MLflow runs",
    )


def _signal_case(root: Path, name: str, sig: int, sweep: bool) -> dict[str, Any]:
    c = Case(root, name)
    marker = c.out / "ready"
    args = ["--multirun", *TINY, "quant.group_size=32,64"] if sweep else [*TINY]
    at = "qpipe.kernels.quant_linear:QuantLinear.from_linear"
    proc = c.start(*args, spec=_ready(marker, at, call=3, sleep=60))
    _wait_file(marker, proc)
    os.kill(int(marker.read_text()), sig)
    out, _ = proc.communicate(timeout=300)
    runs = c.mlflow()
    partials = list((c.out / "cache").rglob("*.partial"))
    running = [r for r in runs if r["status"] == "RUNNING"]
    ok = proc.returncode == 128 + sig and not running and not partials
    states = ", ".join(f"{r['role']} {r['status']}" for r in runs)
    return dict(
        case=f"{signal.Signals(sig).name} during quantize" + (" of a sweep's job" if sweep else ""),
        line=(lines_of(out) or [""])[0],
        exit=proc.returncode,
        verdict=verdict(proc.returncode, out, ok=ok),
        state=f"{states}; partial folders left: {len(partials)}",
    )


def case_launchers(root: Path) -> list[dict[str, Any]]:
    rows = []
    for name, extra in (
        ("hydra.launcher.n_jobs=0", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=0"]),
        ("hydra/launcher=submitit_slurm without SLURM", ["hydra/launcher=submitit_slurm"]),
    ):
        c = Case(root, re.sub(r"\W+", "_", name))
        code, text = c.run("--multirun", *ESTIMATE, "quant=none,rtn", *extra)
        parents = [r for r in c.mlflow() if r["role"] == "parent"]
        rows.append(
            dict(
                case=name,
                line=(lines_of(text) or [""])[0],
                exit=code,
                verdict=verdict(code, text, ok=not parents),
                state=f"parent runs opened: {len(parents)}",
            )
        )
    return rows


def case_ctrl_z(root: Path) -> dict[str, Any]:
    c = Case(root, "ctrl_z")
    marker = c.out / "ready"
    holder = c.start(*TINY, spec=_ready(marker, "qpipe.stages.quantize:run", sleep=600))
    _wait_file(marker, holder)
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGSTOP)  # Ctrl-Z
    start = time.perf_counter()
    code, text = c.run(*TINY, "hydra.run.dir=" + str(c.out / "second"))
    seconds = time.perf_counter() - start
    os.kill(pid, signal.SIGCONT)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    line = (lines_of(text) or [""])[0]
    return dict(
        case="a run stopped with Ctrl-Z while it holds a cache lock; the same command elsewhere",
        line=line,
        exit=code,
        verdict=verdict(code, text, ok=f"pid {pid}" in line),
        state=f"the second run gave up after {seconds:.0f} s (its whole run)",
    )


def case_store(root: Path) -> list[dict[str, Any]]:
    rows = []
    c = Case(root, "store_read_only")
    c.run(*ESTIMATE)
    db = c.out / "mlflow.db"
    undo = None
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0:
            undo = ["chattr", "-i", str(db)]
    else:
        db.chmod(0o444)
    code, text = c.run(*ESTIMATE)
    if undo:
        subprocess.run(undo, check=True)
    rows.append(
        dict(
            case="the MLflow sqlite store read-only",
            line=(lines_of(text) or [""])[0],
            exit=code,
            verdict=verdict(code, text),
            state="refused before the run opened",
        )
    )
    c = Case(root, "store_full")
    c.run(*ESTIMATE)
    db = c.out / "mlflow.db"
    size = db.stat().st_size

    def full() -> None:  # the store's disk has no room for it to grow
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    code, text = c.run(*ESTIMATE, preexec_fn=full)
    rows.append(
        dict(
            case="the MLflow sqlite store on a full disk (RLIMIT_FSIZE at its size)",
            line=(lines_of(text) or [""])[0],
            exit=code,
            verdict=verdict(code, text),
            state="refused before the run opened",
        )
    )
    c = Case(root, "store_locked")
    c.run(*ESTIMATE)
    db = c.out / "mlflow.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    c.env["QPIPE_STORE_BUSY_S"] = "2"
    code, text = c.run(*ESTIMATE)
    con.close()
    rows.append(
        dict(
            case="the MLflow sqlite store locked by another process",
            line=(lines_of(text) or [""])[0],
            exit=code,
            verdict=verdict(code, text, ok=f"pid {os.getpid()}" in text),
            state="refused before the run opened",
        )
    )
    return rows


def _bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def case_inputs(root: Path) -> list[dict[str, Any]]:
    c = Case(root, "inputs")
    (c.out / "a_file").write_text("x")
    (c.out / "loop_a").symlink_to(c.out / "loop_b")
    (c.out / "loop_b").symlink_to(c.out / "loop_a")
    (c.out / "nested.yaml").write_text(
        "name: x\nstages:\n  env_check: {}\n  memory_budget: {needs: [[env_check]]}\n"
    )
    (c.out / "bomb.yaml").write_text(
        _bomb() + "name: bomb\nstages:\n  env_check: {}\n  memory_budget: {needs: [env_check]}\n"
    )
    model = (REPO / "qpipe" / "conf" / "model" / "tiny_llama.yaml").read_text()
    (c.out / "conf" / "model").mkdir(parents=True)
    (c.out / "conf" / "model" / "bomb.yaml").write_text(
        model + "extra:\n" + "".join(f"  {ln}\n" for ln in _bomb().splitlines())
    )
    cases = [
        ("hydra.run.dir naming an existing file", [f"hydra.run.dir={c.out / 'a_file'}"]),
        ("model.path a symlink loop", [f"model.path={c.out / 'loop_a'}"]),
        ("a pipeline whose needs: is a nested list", [f"pipeline={c.out / 'nested.yaml'}"]),
        ("calib.dataset=/dev/zero", ["quant=gptq", "calib.dataset=/dev/zero"]),
        ("a YAML alias bomb as the pipeline", [f"pipeline={c.out / 'bomb.yaml'}"]),
        ("a YAML alias bomb as a model config", ["model=bomb"]),
    ]
    rows = []
    for name, extra in cases:
        start = time.perf_counter()
        code, text = c.run(*ESTIMATE, *extra)
        rows.append(
            dict(
                case=name,
                line=(lines_of(text) or [""])[0],
                exit=code,
                verdict=verdict(code, text),
                state=f"refused in {time.perf_counter() - start:.1f} s (the whole process)",
            )
        )
    return rows


CASES = {
    "bitflip": case_bitflip,
    "emptied": case_emptied,
    "no_outputs": case_no_outputs,
    "same_sweep": case_same_sweep_twice,
    "same_sweep_dir": case_same_sweep_dir,
    "same_second": case_same_second,
    "sighup": lambda r: _signal_case(r, "sighup", signal.SIGHUP, sweep=False),
    "sigterm_sweep": lambda r: _signal_case(r, "sigterm_sweep", signal.SIGTERM, sweep=True),
    "launchers": case_launchers,
    "ctrl_z": case_ctrl_z,
    "store": case_store,
    "inputs": case_inputs,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in CASES.items():
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            got = fn(Path(tmp))
            for row in got if isinstance(got, list) else [got]:
                row["seconds"] = round(time.perf_counter() - start, 1)
                row["line"] = (row["line"] or "").replace(tmp, "…")
                rows.append(row)
                print(f"{row['verdict']:>18}  {row['case']}: {row['line'][:160]}", flush=True)
    clear = sum(r["verdict"].startswith("clear") for r in rows)
    result = result_header(cases=rows, clear=clear, tried=len(rows))
    lines = markdown_heading("Issue 35's cases, run again", result)
    lines += [
        f"{clear} of {len(rows)} clear (exit ≠ 0, one line, no traceback; or, for a fault qpipe "
        "survives, the right result). tiny_llama (random weights), a fresh outputs folder per "
        "case, real processes and signals; the shared CPU makes the seconds upper bounds.",
        "",
        "| case | exit | verdict | the line the user sees | state after | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        line = r["line"].replace("|", "\\|")
        lines.append(
            f"| {r['case']} | {r['exit']} | {r['verdict']} | {line} | {r['state']} | "
            f"{r['seconds']} |"
        )
    write_result(f"fault_cases_{card_slug()}", result, lines, args.out)


if __name__ == "__main__":
    main()
