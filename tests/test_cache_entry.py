"""Cache entries under concurrency (qpipe.store.entry), with real processes: writers of one key
take turns, a waiting writer reuses the finished entry, a killed writer's partial folder is
never published and is cleared by the next writer. The whole-pipeline versions (four identical
runs at once, a joblib sweep sharing a baseline) are in tests/test_launchers.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from qpipe.store.entry import entry_lock, new_partial, publish

ROOT = Path(__file__).resolve().parents[1]

# What every cache does (qpipe.models.source._save_atomically, the runner's stage cache): look,
# and if the entry is not there, write it into a partial folder of one's own and publish it.
_WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from qpipe.store.entry import entry_lock, new_partial, publish
    entry, hold = Path(sys.argv[1]), float(sys.argv[2])
    with entry_lock(entry):
        if (entry / "done.json").is_file():
            print("reused")
            raise SystemExit
        partial = new_partial(entry)
        (partial / "ready").write_text(str(os.getpid()))
        for i in range(5):
            (partial / f"part{i}").write_text(str(os.getpid()) * 1000)
            time.sleep(hold / 5)
        (partial / "done.json").write_text(json.dumps({"pid": os.getpid()}))
        publish(partial, entry)
        print("wrote")
    """
)


def _start(entry: Path, hold: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(entry), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".partial", ".stale"))


def test_four_writers_of_one_key_write_it_once_and_all_get_it(tmp_path) -> None:
    entry = tmp_path / "cache" / "key"
    procs = [_start(entry, 0.5) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["reused", "reused", "reused", "wrote"]
    writer = json.loads((entry / "done.json").read_text())["pid"]
    # One writer's files only, whole: nobody wrote into or deleted another's folder.
    assert {(entry / f"part{i}").read_text() for i in range(5)} == {str(writer) * 1000}
    assert _leftovers(entry.parent) == []


def test_a_killed_writer_is_never_published_and_the_next_one_clears_it(tmp_path) -> None:
    entry = tmp_path / "key"
    killed = _start(entry, 30)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("key.*.partial/ready")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        time.sleep(0.05)
    waiting = _start(entry, 0.1)  # blocks on the lock the first one holds
    time.sleep(0.5)
    assert waiting.poll() is None, "the second writer did not wait for the first"
    killed.send_signal(signal.SIGKILL)  # the kernel drops its lock
    killed.communicate()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and out.strip() == "wrote", err
    assert json.loads((entry / "done.json").read_text())["pid"] == waiting.pid
    assert _leftovers(tmp_path) == []


def test_a_damaged_entry_is_replaced_whole(tmp_path) -> None:
    entry = tmp_path / "key"
    entry.mkdir()
    (entry / "half").write_text("left by a writer of an older qpipe")
    with entry_lock(entry), entry_lock(entry):  # re-entrant within one process
        partial = new_partial(entry)
        assert partial.parent == tmp_path and partial.name.endswith(".partial")
        (partial / "whole").write_text("new")
        publish(partial, entry)
    assert sorted(p.name for p in entry.iterdir()) == ["whole"]
    assert _leftovers(tmp_path) == []
