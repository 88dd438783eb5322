"""Run ``python -m qpipe`` with one fault armed at a named point of the real code.

    python tests/fault_driver.py '<json spec>' <qpipe overrides...>

spec: {"at": "module:attr.path", "call": N, "action": ...} wraps that function; on its N-th
call the action happens inside the running pipeline:
- "sigkill": the process kills itself with SIGKILL (what the OOM killer or `kill -9` does);
- "truncate_then_sigkill": (for safetensors' save) write the file, cut it to half, SIGKILL:
  a process that died in the middle of writing a checkpoint;
- "signal_ready": write the file named by "marker" and sleep "sleep" seconds, so that the
  test can act from outside (Ctrl-C to the process group, kill the tracking server).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def _arm(spec: dict) -> None:
    module_name, attr_path = spec["at"].split(":")
    owner = importlib.import_module(module_name)
    *parents, leaf = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, leaf)
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != int(spec.get("call", 1)):
            return original(*args, **kwargs)
        action = spec["action"]
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "truncate_then_sigkill":
            result = original(*args, **kwargs)
            target = Path(args[1] if len(args) > 1 else kwargs["filename"])
            with open(target, "r+b") as f:
                f.truncate(target.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
            return result
        if action == "signal_ready":
            Path(spec["marker"]).write_text(str(os.getpid()))
            time.sleep(float(spec.get("sleep", 30)))
            return original(*args, **kwargs)
        raise ValueError(f"unknown action {action!r}")

    # A classmethod is found already bound to its class: keep calling it that way.
    if isinstance(owner, type) and isinstance(owner.__dict__.get(leaf), classmethod):
        setattr(owner, leaf, staticmethod(faulty))
    else:
        setattr(owner, leaf, faulty)


def main() -> None:
    # As in a terminal's foreground job: a background launcher (`cmd &`, CI runners) may have
    # left SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = json.loads(sys.argv[1])
    if spec:
        _arm(spec)
    sys.argv = ["qpipe", *sys.argv[2:]]
    from qpipe.__main__ import main as qpipe_main

    qpipe_main()


if __name__ == "__main__":
    main()
