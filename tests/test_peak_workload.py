"""validate_vram's workload: where the budgeted workload's peak is, and how it is measured on
CPU (docs/memory.md, "Where the peak is")."""

from __future__ import annotations

import pytest
import torch

from qpipe.devices.measure import HostTensorPeak, MemoryWindow
from qpipe.stages.validate_vram import PEAK_DECODE_STEPS, generate_to_context
from tests.conftest import random_llama

CONTEXT = 256
OLD_NEW_TOKENS = 32  # what validate_vram decoded before: eval.max_new_tokens


@pytest.fixture(scope="module")
def model():
    # MLP four times the width: the transient that sets a decoder's peak, as in real models
    return random_llama(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=CONTEXT,
    )


def _peak(model, prompt: int, new: int) -> int:
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(0))
    tracker = HostTensorPeak().start()
    generate_to_context(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, new)
    peak = tracker.stop()
    assert peak is not None and peak > 0
    return peak


def test_the_prompt_sets_the_peak_and_decode_steps_add_little(model) -> None:
    """Both workloads end with CONTEXT tokens in the KV cache; the old one decoded 32 tokens
    after a 224-token prompt, the new one decodes 4 after 252. A decode step holds one token's
    transients beside the cache, the prompt holds every prompt token's, so each workload's
    peak is its prompt's: equal to the prompt alone within 1 % (allocator-exact bytes, so the
    tolerance only covers a step's own few kB), and the two differ by the prompt lengths'
    ratio, within that 1 % again: the new measurement is the old one's, 28 prompt tokens
    closer to the context_len the estimate prices."""
    old_prompt, new_prompt = CONTEXT - OLD_NEW_TOKENS, CONTEXT - PEAK_DECODE_STEPS
    old = _peak(model, old_prompt, OLD_NEW_TOKENS)
    new = _peak(model, new_prompt, PEAK_DECODE_STEPS)
    assert old == pytest.approx(_peak(model, old_prompt, 1), rel=0.01)
    assert new == pytest.approx(_peak(model, new_prompt, 1), rel=0.01)
    assert new / old == pytest.approx(new_prompt / old_prompt, rel=0.01)


def test_cpu_window_measures_the_model_tensors_and_the_runs_peak(model) -> None:
    """On CPU the running phase is measured as the model's tensors plus the most the run held
    at once in PyTorch's allocator; the resident set's growth stays beside it."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    window = MemoryWindow("cpu").start()
    window.split_host_peak()
    window.track_tensors(model)
    ids = torch.zeros(1, 256, dtype=torch.long)
    generate_to_context(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 2)
    window.read()
    window.close()
    assert window.measures_tensors
    assert window.tensors_base >= weights
    # the run's peak: at least the KV cache it ends with (2 layers × K and V, fp32)
    assert window.tensors_peak > 2 * 2 * 2 * 32 * 258 * 4
    assert window.used_gb * 1e9 == window.tensors_base + window.tensors_peak
    assert window.growth_gb >= 0


_FREES = """
import psutil, torch
from qpipe.devices.measure import return_freed_host_memory
assert return_freed_host_memory()
proc = psutil.Process()
torch.ones(64 * 2**18).sum()  # the fill's worker threads start once, with their stacks
for size in (64, 16, 8):  # MB: glibc's default would raise its threshold past 8 MB
    before = proc.memory_info().rss
    block = torch.ones(size * 2**18)  # fp32
    assert proc.memory_info().rss - before > size * 2**20 * 0.9
    del block
    assert proc.memory_info().rss - before < 2**20, size
print("returned")
"""


def test_freed_host_memory_goes_back_to_the_os() -> None:
    """With glibc, a freed 8 MB tensor leaves the resident set at once (the threshold is
    fixed at 1 MB), however large the tensors freed before it were. In a fresh process: a
    heap that already holds large free chunks serves such blocks from them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from qpipe.devices.measure import _libc

    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        pytest.skip("not glibc")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", _FREES], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0 and "returned" in out.stdout, out.stderr[-2000:]
