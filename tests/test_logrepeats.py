"""Issue 12: a library message repeated on every call (bitsandbytes' int8 matmul logs "inputs
will be cast from torch.float32 to float16" per call) is shown once per run, with its count."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from qpipe.backends import QuantizeRequest, get_backend
from qpipe.console.logrepeats import once_per_run
from tests.conftest import save_random_llama

CAST = "MatMul8bitLt: inputs will be cast"


def test_bitsandbytes_int8_cast_message_is_shown_once(tmp_path: Path, caplog) -> None:
    folder = save_random_llama(
        tmp_path / "src",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=128,
    )
    backend = get_backend("bnb")
    quant = {"name": "bnb_int8", "method": "bnb", "bits": 8, "group_size": 0, "threshold": 6.0}
    request = QuantizeRequest(
        source=folder,
        model_class="AutoModelForCausalLM",
        quant=quant,
        skip_modules=["lm_head"],
        targets=[],
        output_dir=tmp_path / "int8",
        device="cpu",
        dtype=torch.float32,
    )
    model = backend.load(
        backend.quantize(request).checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch"
    )
    ids = torch.randint(0, 128, (1, 8))
    caplog.set_level(logging.WARNING)
    caplog.clear()
    with once_per_run():
        with torch.no_grad():
            for _ in range(5):
                model(ids)
        for _ in range(3):  # warnings.warn from a place whose registry is reset between calls
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.warn("a per-call library warning", UserWarning, stacklevel=1)
    cast = [r for r in caplog.records if CAST in r.getMessage()]
    # Once as bitsandbytes said it, once in qpipe's count of what was held back.
    assert [r.name.split(".")[0] for r in cast] == ["bitsandbytes", "qpipe"]
    per_call = 7 * 5  # 7 int8 Linear layers (q, k, v, o, gate, up, down) x 5 forward passes
    assert f"(shown once; {per_call - 1} more copies held back)" in cast[1].getMessage()
    held = [
        r.getMessage() for r in caplog.records if "a per-call library warning" in r.getMessage()
    ]
    assert held == [
        "py.warnings.UserWarning: a per-call library warning (shown once; 2 more copies held back)"
    ]
    # Outside a run nothing is filtered: one copy per int8 layer again.
    with torch.no_grad():
        model(ids)
    assert sum(CAST in r.getMessage() for r in caplog.records) == 2 + 7
