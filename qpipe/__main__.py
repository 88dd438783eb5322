"""``python -m qpipe [overrides]``: the Hydra entry point.

Examples::

    python -m qpipe                                   # SmolLM2, unquantized, full pipeline
    python -m qpipe +model=internvl +quant=awq        # the users' form
    python -m qpipe --multirun quant=none,bnb_nf4,bnb_int8
    python -m qpipe model=internvl model.weights=random pipeline=estimate hardware=rtx4090_24gb
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from qpipe.app import print_summary, run_pipeline
from qpipe.config import normalize_overrides
from qpipe.errors import QpipeError
from qpipe.gpu_slots import parallel_jobs, pin_job, visible_gpu_count

log = logging.getLogger("qpipe")

# At import, not in main(): launchers that run jobs in other processes (submitit) import this
# module there to reach the task function, and compose the launcher config there too.
OmegaConf.register_new_resolver("qpipe.parallel_jobs", parallel_jobs, replace=True)
OmegaConf.register_new_resolver("qpipe.visible_gpus", visible_gpu_count, replace=True)
# qpipe's conf/hydra/launcher/*.yaml carry every key of the launcher plugins' schemas, so they
# work with or without Hydra's (deprecated) schema matching by name.
warnings.filterwarnings("ignore", message="(?s).*validated against ConfigStore schema")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    tags = {"qpipe.overrides": " ".join(hc.overrides.task)}
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        # One tag per sweep so the MLflow UI can select exactly its jobs.
        tags["qpipe.sweep"] = Path(hc.sweep.dir).name
        tags["qpipe.sweep_job"] = str(hc.job.num)
        tags.update(pin_job(cfg))  # one job per GPU: before anything starts CUDA
    console = Console(stderr=False)
    try:
        report = run_pipeline(cfg, run_dir, tags, log_file=run_dir / "qpipe.log")
    except QpipeError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        if multirun:
            return None
        sys.exit(2)
    print_summary(cfg, report, console)
    if report.status != "FINISHED" and not multirun:
        sys.exit(1)
    return report.metrics.get("quality.ppl")


def main() -> None:
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
