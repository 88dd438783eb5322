"""The total a GPU run needs as NVML (nvidia-smi) shows it: the allocator's peak, the caching
allocator's reserve at that peak and the CUDA context with the libraries' workspaces; priced
by the estimator and measured by validate_vram (docs/memory.md, "The total")."""

from __future__ import annotations

import pytest

from qpipe.backends import weight_format_of
from qpipe.config.compose import load_group
from qpipe.devices.envinfo import measure_cuda_context_gb
from qpipe.devices.measure import MemoryWindow, NvmlPeak
from qpipe.memory import Workload, arch_dims, build_inventory, estimate
from qpipe.memory.estimator import RESERVE_PER_TRANSIENT
from qpipe.memory.exclusion import plan_precision
from qpipe.models import load_config
from qpipe.stages.validate_vram import _gpu_total_metrics
from tests.conftest import compose_config


def test_total_is_peak_plus_reserve_plus_runtime_on_a_gpu_only() -> None:
    from omegaconf import OmegaConf

    model_cfg = load_group("model", "internvl")
    config = load_config(model_cfg)
    inv = build_inventory(config, model_cfg.model_class)
    plan = plan_precision(inv, OmegaConf.to_container(compose_config().exclude), True)
    awq = weight_format_of(
        {"method": "awq", "bits": 4, "group_size": 64, "symmetric": False}, 2, "cuda"
    )
    dims, work = arch_dims(config), Workload(batch_size=1, context_len=2048)
    gpu = estimate(inv, plan, awq, dims, work, 2, runtime_gb=0.71, device="cuda")
    cpu = estimate(inv, plan, awq, dims, work, 2, runtime_gb=0.0, device="cpu")
    assert gpu.reserve_gb == pytest.approx(RESERVE_PER_TRANSIENT * gpu.activations_gb)
    assert gpu.total_gb == pytest.approx(gpu.peak_gb + gpu.reserve_gb + 0.71)
    assert cpu.reserve_gb == 0 and cpu.total_gb == cpu.peak_gb


def test_validate_reports_the_total_against_nvml_and_where_it_went() -> None:
    window = MemoryWindow("cuda:0")  # as read after a run: bytes, NVML in GB
    window.baseline, window.peak = 40_000_000, 7_800_000_000
    window.reserved_peak, window.reserved_now = 8_100_000_000, 8_000_000_000
    window.nvml_gb, window.nvml_now_gb = 8.86, 8.72
    metrics = _gpu_total_metrics(window, {"total_gb": 8.60})
    assert metrics["mem.nvml_process_gb"] == 8.86
    assert metrics["mem.est_total_error_pct"] == pytest.approx((8.60 - 8.86) / 8.86 * 100)
    assert metrics["mem.reserve_at_peak_gb"] == pytest.approx(0.3)
    assert metrics["mem.context_gb"] == pytest.approx(0.72)
    assert metrics["mem.held_before_load_gb"] == pytest.approx(0.04)


def test_without_a_gpu_nothing_is_sampled_and_no_context_is_priced() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    sampler = NvmlPeak(0).start()
    sampler.stop()
    assert sampler.peak is None or sampler.peak >= 0  # NVML may answer on a GPU-less host
    assert measure_cuda_context_gb("cpu") == 0.0


@pytest.mark.gpu
def test_nvml_peak_holds_the_allocators_reserve_on_a_gpu() -> None:
    """On a GPU: a freed tensor's memory stays reserved by the caching allocator, and NVML's
    sampled peak for the process holds it (with the context measured at env_check)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    context = measure_cuda_context_gb("cuda")
    window = MemoryWindow("cuda").start()
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    del block  # freed, still reserved
    window.read()
    window.close()
    if window.nvml_gb is None:
        pytest.skip("NVML does not answer here")
    assert window.reserved_peak >= 512 * 2**20
    assert window.nvml_gb * 1e9 >= window.reserved_peak
    assert context is not None and 0 < context < window.nvml_gb
