"""``python -m qpipe [overrides]``: the Hydra entry point.

Examples::

    python -m qpipe                                   # SmolLM2, unquantized, full pipeline
    python -m qpipe +model=internvl +quant=awq        # the users' form
    python -m qpipe --multirun quant=none,bnb_nf4,bnb_int8
    python -m qpipe +sweep=bits                      # a preset: GPTQ/RTN at 2/3/4/8 bits
    python -m qpipe model=internvl model.weights=random pipeline=estimate hardware=rtx4090_24gb
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import warnings
from pathlib import Path

from qpipe.errors import ConfigRefusal, QpipeError
from qpipe.store.paths import check_outputs_root, contain_library_caches


def _outputs_usable() -> None:
    """Before anything imports TorchInductor, Triton or matplotlib: each makes its cache
    under the outputs folder, and fails with a long traceback where it cannot."""
    try:
        check_outputs_root()
    except QpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


_outputs_usable()
contain_library_caches()  # before transformers, triton and matplotlib read their settings

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from qpipe import sweep  # noqa: E402
from qpipe.app import print_summary, run_pipeline  # noqa: E402
from qpipe.config import searchpath  # noqa: E402
from qpipe.config.compose import CONF_DIR, normalize_overrides  # noqa: E402
from qpipe.console import signals  # noqa: E402
from qpipe.devices.gpu_slots import parallel_jobs, pin_job, visible_gpu_count  # noqa: E402

log = logging.getLogger("qpipe")

# At import, not in main(): launchers that run jobs in other processes (submitit) import this
# module there to reach the task function, and compose the launcher config there too.
OmegaConf.register_new_resolver("qpipe.parallel_jobs", parallel_jobs, replace=True)
OmegaConf.register_new_resolver("qpipe.visible_gpus", visible_gpu_count, replace=True)
# A token of its own for every run and sweep folder (cached: resolved once per composed config,
# like ${now:}, and kept for a sweep's jobs): two runs started in the same second, from a shell
# loop or two terminals, never share a folder.
OmegaConf.register_new_resolver(
    "qpipe.run_token", lambda: secrets.token_hex(3), use_cache=True, replace=True
)
# qpipe's conf/hydra/launcher/*.yaml carry every key of the launcher plugins' schemas, so they
# work with or without Hydra's (deprecated) schema matching by name.
warnings.filterwarnings("ignore", message="(?s).*validated against ConfigStore schema")


# An absolute path: Hydra resolves a relative one against the calling *module* when the
# entry point is the `qpipe` console script (qpipe.__main__), and qpipe.conf is no package.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    signals.install()  # a launcher's worker process (joblib, submitit) runs no main()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    tags = {"qpipe.overrides": " ".join(hc.overrides.task)}
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        # One tag per sweep so the MLflow UI can select exactly its jobs.
        tags["qpipe.sweep"] = Path(hc.sweep.dir).name
        tags["qpipe.sweep_job"] = str(hc.job.num)
        tags.update(pin_job(cfg))  # one job per GPU: before anything starts CUDA
    if multirun and sweep.current() is not None:
        return sweep.run_sweep_job(cfg, list(hc.overrides.task), hc.job.num, run_dir, tags)
    console = Console(stderr=False)
    try:
        report = run_pipeline(cfg, run_dir, tags, log_file=run_dir / "qpipe.log")
    except QpipeError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        if multirun:
            return None
        sys.exit(2)
    print_summary(cfg, report, console)
    if report.status != "FINISHED" and not multirun:
        sys.exit(1)
    return report.metrics.get("quality.ppl")


def _say(line: str, stream=None) -> None:
    """One line to the terminal, which may be gone (SIGHUP: a closed terminal, a dropped ssh)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=stream or sys.stdout, flush=True)


def main() -> None:
    _outputs_usable()
    sweep.forget()
    signals.install()  # before anything slow: SIGTERM/SIGHUP end a run like Ctrl-C from here on
    try:
        sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
        searchpath.register()  # ./conf before the built-ins, every config file checked
        _hydra_main()
    except ConfigRefusal as refusal:  # refused while Hydra composed or launched
        _say(f"error: {refusal}", sys.stderr)
        sys.exit(2)
    except QpipeError as err:  # refused before Hydra ran (the overrides' own config files)
        _say(f"error: {err}", sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        # The run is already marked KILLED and its partial output removed (qpipe.app); a
        # sweep's parent run is closed KILLED here. One line, no traceback, the shell's code.
        name = getattr(interrupt, "signal_name", None) or signals.pending() or "SIGINT"
        sweep.interrupted(name)
        _say(f"interrupted ({name}): the run is marked KILLED, partial output removed")
        sys.exit(signals.exit_code(interrupt))
    finally:
        signals.clear()
        signals.restore()
    # A sweep runs all its jobs; any that failed make the whole command fail (listed above).
    if sweep.exit_code():
        sys.exit(sweep.exit_code())


if __name__ == "__main__":
    main()
