"""``python -m qpipe.cache``: what ``outputs/cache`` holds, how big it is, and clearing it.

    python -m qpipe.cache                            # every cache entry, its size, whether a run uses it
    python -m qpipe.cache clear --unreferenced       # what no run's record mentions
    python -m qpipe.cache clear --all                # everything (also writes in progress)
    python -m qpipe.cache clear --compiled           # compiled kernels, graphs and tuning only
    python -m qpipe.cache clear --unreferenced --dry-run   # say what would go, delete nothing
    python -m qpipe.cache verify                     # hash every entry whole against its manifest

Entries are the cached stage results (``stages/<stage>/<key>``: quantized checkpoints, the
baseline's reference, sensitivity rankings), model copies made from GGUF or random weights
(``models/``), tokenizers (``tokenizers/``), the compiled work a run reuses (``compiled``:
TorchInductor's compiled graphs, Triton's kernels, the 4-bit kernel tuner's choices, the
warm-up times of earlier runs: one entry each), and the other libraries' caches kept under
outputs (matplotlib, Hugging Face modules: one entry each).

A run references a cache entry when its record — the JSON a run writes in its folder
(``runs/``, ``multirun/``) and logs to MLflow (``mlartifacts/``) — names the entry's path.
Library and compiled caches are never "unreferenced": ``--compiled`` clears the compiled ones
(the next run compiles and tunes again: a minute or two for an 8B model on a GPU), ``--all``
everything.

Anything whose name contains ``.partial`` is a write in progress (or one a killed process
left): it is listed as such, never counted as an entry, and cleared only by ``--all`` or, by
``--unreferenced``, once it is older than ``PARTIAL_STALE_H`` hours.

Every entry carries the manifest it was sealed with (qpipe.store.entry): a run checks an entry
before reusing it and moves a damaged one aside (``<entry>.damaged-<time>``, kind "damaged"
here, kept for inspection until ``clear``). ``verify`` hashes every file of every entry whole —
what a run does only for files whose stat changed — and moves the damaged ones aside too; its
exit code is 1 when it found any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qpipe.errors import QpipeError
from qpipe.store.entry import DAMAGED, entry_lock, entry_problem, move_aside
from qpipe.store.paths import outputs_root
from qpipe.store.results import RECORD, record_problem

PARTIAL = ".partial"
PARTIAL_STALE_H = 24.0  # a write in progress this old has no writer left
RESULT_KINDS = ("stages", "models", "tokenizers")  # run results: what runs can reference
# Compiled work the next run reuses (qpipe.store.paths, qpipe.kernels.tuning, the benchmark)
COMPILED = ("torchinductor", "triton", "kernel_tuning", "warmup")
RECORD_FOLDERS = ("runs", "multirun", "mlartifacts")
_REFERENCE = re.compile(r"cache/(stages/[^/\"\\\s]+/[^/\"\\\s]+|[^/\"\\\s]+/[^/\"\\\s]+)")


@dataclass
class Entry:
    path: Path
    kind: str  # a stage's name (quantize, ...), "model", "tokenizer", "compiled", "library"
    name: str  # relative to the cache folder
    size: int
    mtime: float
    partial: bool = False
    referenced: bool | None = None  # None: not a run result (library caches)


def tree_size(path: Path) -> tuple[int, float]:
    """Bytes under ``path`` (links not followed) and the newest modification time."""
    if not path.is_dir() or path.is_symlink():
        info = path.lstat()
        return info.st_size, info.st_mtime
    total, newest = 0, path.lstat().st_mtime
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:  # removed while we looked (a writer finishing)
                continue
            total += info.st_size
            newest = max(newest, info.st_mtime)
    return total, newest


def _entry(cache: Path, path: Path, kind: str) -> Entry:
    size, mtime = tree_size(path)
    kind = "damaged" if DAMAGED in path.name else kind
    return Entry(path, kind, str(path.relative_to(cache)), size, mtime, PARTIAL in path.name)


def _not_lock(path: Path) -> bool:
    """Lock files (``<entry>.lock``) belong to their entry: never listed, never cleared."""
    return path.suffix != ".lock"


def entries(cache: Path) -> list[Entry]:
    """Every entry and every write in progress under ``cache``."""
    out: list[Entry] = []
    if not cache.is_dir():
        return out
    for top in sorted(cache.iterdir()):
        if PARTIAL in top.name:
            out.append(_entry(cache, top, "?"))
        elif top.name == "stages" and top.is_dir():
            for stage in sorted(p for p in top.iterdir()):
                if not stage.is_dir():
                    out.append(_entry(cache, stage, "stage"))
                    continue
                out.extend(
                    _entry(cache, p, stage.name) for p in sorted(stage.iterdir()) if _not_lock(p)
                )
        elif top.name in RESULT_KINDS and top.is_dir():
            kind = top.name.rstrip("s")
            out.extend(_entry(cache, p, kind) for p in sorted(top.iterdir()) if _not_lock(p))
        elif top.name in COMPILED:
            out.append(_entry(cache, top, "compiled"))
        else:
            out.append(_entry(cache, top, "library"))
    return out


def referenced_names(root: Path) -> set[str]:
    """Cache paths (relative to ``cache/``, cut to an entry) that a run record names."""
    names: set[str] = set()
    for folder in RECORD_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for record in base.rglob("*.json"):
            try:
                text = record.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if "cache/" in text:
                names.update(_REFERENCE.findall(text))
    return names


def survey(root: Path | None = None) -> list[Entry]:
    """Entries of ``<root>/cache``, each marked referenced or not (library caches: None)."""
    root = root or outputs_root()
    found = entries(root / "cache")
    names = referenced_names(root)
    for entry in found:
        if entry.kind not in ("library", "compiled") and not entry.partial:
            entry.referenced = entry.name in names
    return found


def removable(
    found: list[Entry], everything: bool, now: float | None = None, compiled: bool = False
) -> list[Entry]:
    """What ``clear`` removes: everything, the compiled caches (``compiled``), or the run
    results no record references and the writes in progress older than ``PARTIAL_STALE_H``."""
    if everything:
        return list(found)
    if compiled:
        return [e for e in found if e.kind == "compiled"]
    now = time.time() if now is None else now
    stale = now - PARTIAL_STALE_H * 3600
    return [
        e
        for e in found
        if (e.partial and e.mtime < stale) or (not e.partial and e.referenced is False)
    ]


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _age(mtime: float) -> str:
    seconds = max(time.time() - mtime, 0)
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def listing(root: Path, found: list[Entry], console: Console) -> None:
    cache = root / "cache"
    done = [e for e in found if not e.partial]
    writing = [e for e in found if e.partial]
    total = sum(e.size for e in found)
    console.print(
        f"{cache}: {human(total)} in {len(done)} entries"
        + (f" (+{len(writing)} in progress)" if writing else ""),
        highlight=False,
    )
    if not found:
        return
    table = Table()
    table.add_column("kind", no_wrap=True)
    table.add_column("entry", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("in use", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    for e in sorted(done, key=lambda e: -e.size) + writing:
        used = {True: "yes", False: "no", None: "—"}[e.referenced]
        if e.partial:
            used = "writing"
        table.add_row(e.kind, Path(e.name).name, human(e.size), used, _age(e.mtime))
    console.print(table)
    console.print(
        "in use: a run's record names it (run folders, MLflow artifacts); "
        "writing: a write in progress, or left by a killed run",
        style="dim",
    )
    unused = human(sum(e.size for e in removable(found, everything=False)))
    compiled = human(sum(e.size for e in removable(found, False, compiled=True)))
    console.print("to clear:", highlight=False)
    console.print(
        f"  python -m qpipe.cache clear --unreferenced   # {unused}: what no run uses",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"  python -m qpipe.cache clear --compiled       # {compiled}: compiled code, tuning",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"  python -m qpipe.cache clear --all            # {human(total)}: everything",
        highlight=False,
        soft_wrap=True,
    )


def clear(
    found: list[Entry], everything: bool, dry_run: bool, console: Console, compiled: bool = False
) -> int:
    """Remove what ``removable`` picks; the bytes it freed (or would free)."""
    freed = 0
    for e in removable(found, everything, compiled=compiled):
        console.print(f"{'would remove' if dry_run else 'removing'} {e.name} ({human(e.size)})")
        if not dry_run:
            if e.path.is_dir() and not e.path.is_symlink():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
        freed += e.size
    verb = "would free" if dry_run else "freed"
    console.print(f"{verb} {human(freed)}", highlight=False)
    return freed


def verify(found: list[Entry], console: Console) -> int:
    """Hash every run-result entry whole against its manifest; move the damaged aside. The
    number of damaged entries."""
    # qpipe's own entries carry manifests; compiled work is the libraries' to check
    checked = [
        e for e in found if not e.partial and e.kind not in ("library", "damaged", "compiled")
    ]
    start, hashed, damaged, unsealed = time.perf_counter(), 0, 0, 0
    for e in checked:
        what = "model folder" if e.kind == "model" else e.kind
        what = what if e.kind in ("model", "tokenizer") else f"{e.kind} result"
        try:
            with entry_lock(e.path):
                problem = entry_problem(e.path, full=True) if e.path.is_dir() else "not a folder"
                if problem is None and e.name.startswith("stages/"):
                    try:
                        problem = record_problem(json.loads((e.path / RECORD).read_text()))
                    except (OSError, ValueError) as err:
                        problem = f"{RECORD} is unreadable ({type(err).__name__})"
                if problem is not None and problem.startswith("it has no manifest"):
                    unsealed += 1
                    console.print(f"? {e.name}: {escape(problem)}", highlight=False)
                    continue
                if problem is not None:
                    aside = move_aside(e.path, problem, what)
                    damaged += 1
                    console.print(
                        f"[red]✘ {e.name}: {escape(problem)}; moved aside to {aside.name}[/red]",
                        highlight=False,
                        soft_wrap=True,
                    )
                    continue
        except QpipeError as err:  # its lock is held by a stopped process, or for too long
            console.print(f"? {e.name}: not checked ({escape(str(err))})", soft_wrap=True)
            continue
        hashed += e.size
        console.print(f"✔ {e.name} ({human(e.size)})", highlight=False)
    seconds = time.perf_counter() - start
    console.print(
        f"{len(checked)} entries: {len(checked) - damaged - unsealed} whole ({human(hashed)} "
        f"hashed in {seconds:.1f} s), {damaged} damaged (moved aside), {unsealed} without a "
        "manifest",
        highlight=False,
    )
    return damaged


def main(argv: list[str] | None = None, console: Console | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qpipe.cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", choices=("list", "clear", "verify"), default="list")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--all", action="store_true", help="clear everything")
    what.add_argument(
        "--unreferenced", action="store_true", help="clear what no run references (and old writes)"
    )
    what.add_argument(
        "--compiled",
        action="store_true",
        help="clear compiled kernels and graphs and the kernel tuner's choices",
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    parser.add_argument(
        "--outputs", type=Path, default=None, help="the outputs folder (default: QPIPE_OUTPUTS)"
    )
    args = parser.parse_args(argv)
    console = console or Console()
    root = (args.outputs or outputs_root()).resolve()
    found = survey(root)
    if args.action == "list":
        listing(root, found, console)
        return
    if args.action == "verify":
        if verify(found, console):
            raise SystemExit(1)
        return
    if not (args.all or args.unreferenced or args.compiled):
        parser.error("clear needs --all, --compiled or --unreferenced")
    clear(found, args.all, args.dry_run, console, compiled=args.compiled)


if __name__ == "__main__":
    main()
