"""Host time per eager QuantLinear call at M=1 (what eager decoding pays per layer), against
F.linear, and a profile of where it goes:  python bench/eager_overhead.py"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qpipe.kernels import QuantLinear  # noqa: E402

lin = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
q = QuantLinear.from_linear(lin, group_size=128, symmetric=False, kernel="triton")
x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
with torch.inference_mode():
    for mod, name in ((lin, "F.linear"), (q, "QuantLinear")):
        mod(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            mod(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{name}: {(t1 - t0) / 2000 * 1e6:.1f} us host per call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        q(x)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
