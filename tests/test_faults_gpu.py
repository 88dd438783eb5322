"""CUDA out-of-memory inside a real run (GPU only): the run fails at load with the requested
and free memory and the estimate, the memory is given back, and the next run finishes.
bench/gpu_oom.py does the same for load, validate_vram and benchmark on an 8B model."""

from __future__ import annotations

import pytest
import torch

from qpipe.app import run_pipeline
from tests.conftest import compose_config

pytestmark = pytest.mark.gpu

OVERRIDES = (
    "model=tiny_llama",
    "quant=none",
    "device=cuda",
    "hardware=h100_80gb",  # named: the budget passes, the allocation is what fails
    "eval=quick",
    "eval.baseline=false",
    "eval.decode=eager",
    "workload.context_len=64",
    "mlflow.experiment=oom_gpu",
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_oom_in_load_fails_cleanly_and_the_next_run_finishes(tmp_path) -> None:
    cfg = compose_config(*OVERRIDES)
    from qpipe.models import load_tokenizer, materialize

    materialize(cfg.model)
    load_tokenizer(cfg.model)
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - 40 * 2**20, dtype=torch.uint8, device="cuda")  # 40 MiB left
    held = torch.cuda.memory_allocated()
    try:
        report = run_pipeline(cfg, tmp_path / "oom")
    finally:
        del hog
    assert report.status == "FAILED" and report.failed_stage == "load", report.error
    assert "CUDA out of memory in load" in report.error
    assert "requested" in report.error and "free" in report.error
    assert "estimated a peak" in report.error and "\n" not in report.error
    after = float(report.error.rsplit("allocator now holds ", 1)[1].split(" GB")[0])
    assert after * 1e9 <= held + 2**20  # nothing of the failed load stayed allocated
    again = run_pipeline(cfg, tmp_path / "next")
    assert again.status == "FINISHED", again.error
