"""The fragment-order W4A16 kernel against the fp32 reference on every shape of issues 20 and 34,
at M = 1, 2, 4, 8, 16, 32, 64 (more with --ms), fp16 and bf16, symmetric and asymmetric weights:
every launch configuration the tuner may try (the dense prefill path's chunk sizes from
frag_dense.TUNE_MIN_M rows on, where its self-check passed), fresh random inputs per case, the output poisoned (NaN)
before each launch, and the split-K counters checked zero after. Also: where the kernel runs
here (``frag_w4a16.unavailable``) and the compiled kernels' registers / spills.

    python bench/frag_check.py [--out DIR] [--shapes all] [--ms 1,2,4,8,16,32,64]

Writes DIR/frag_check_<card>.json/.md (bench/harness.py); exits 1 if any case fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
from kernel_bench import parse_shapes  # noqa: E402

from qpipe.kernels import frag_dense, frag_w4a16  # noqa: E402
from qpipe.kernels.layout import frag_w4, pack_int4_rows  # noqa: E402
from qpipe.kernels.tuning import _launch_any, frag_candidates  # noqa: E402
from qpipe.kernels.workspace import WORKSPACE  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _resources(kernels: list) -> list[str]:
    """cuobjdump -res-usage of the cubins this process compiled (registers, spills)."""
    out = []
    for kernel in kernels:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel._cubin)
            f.flush()
            try:
                text = subprocess.run(["cuobjdump", "-res-usage", f.name], capture_output=True,
                                      text=True, timeout=30).stdout  # fmt: skip
            except (OSError, subprocess.SubprocessError) as err:
                return [f"cuobjdump: {err}"]
        out += [ln.strip() for ln in text.splitlines() if "REG:" in ln or "Function" in ln]
    return out


def check(shapes, ms, log=print) -> dict:
    dev = torch.device("cuda")
    reason = frag_w4a16.unavailable(dev)
    result = {"unavailable": reason, "cases": [], "failures": []}
    if reason is not None:
        log(f"fragment kernel unavailable here: {reason}")
        return result
    result["dense_unavailable"] = frag_dense.unavailable(dev)
    dense = result["dense_unavailable"] is None
    log(f"dense prefill path: {result['dense_unavailable'] or 'runs'}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        t0 = time.time()
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=gen)
        qw = frag_w4(pack_int4_rows(q))
        groups = k // 128
        z = torch.randint(0, 16, (groups, n), device="cuda", dtype=torch.uint8, generator=gen)
        s32 = torch.rand(groups, n, device="cuda", generator=gen) * 0.02 + 0.002
        worst = {}
        for dtype in (torch.float16, torch.bfloat16):
            s = s32.to(dtype)
            for zeros in (None, z):
                zf = 8.0 if zeros is None else zeros.float().t().repeat_interleave(128, dim=1)
                w = ((q.float() - zf) * s.float().t().repeat_interleave(128, dim=1)).to(dtype)
                w = w.float()
                for m in ms:
                    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
                    ref = x.float() @ w.t()
                    for cfg in frag_candidates(m, n, k, dev, dense):
                        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                        _launch_any(x, qw, s, zeros, 128, None, cfg, out=y)
                        torch.cuda.synchronize()
                        rel = float((y.float() - ref).norm() / ref.norm())
                        ok = bool(torch.isfinite(y).all()) and rel < TOL[dtype]
                        case = {"shape": [n, k], "m": m, "dtype": str(dtype), "zeros": zeros is not None,
                                "cfg": cfg.as_dict(), "rel": rel, "ok": ok}  # fmt: skip
                        result["cases"].append(case)
                        key = (str(dtype).removeprefix("torch."), m)
                        worst[key] = max(worst.get(key, 0.0), rel)
                        if not ok:
                            result["failures"].append(case)
                            log(f"FAIL {n}x{k} M={m} {dtype} zeros={zeros is not None} {cfg} "
                                f"rel {rel:.3g}")  # fmt: skip
                del w
        _, cnt = WORKSPACE._bufs[torch.device("cuda", torch.cuda.current_device())]
        if not bool((cnt == 0).all()):
            result["failures"].append({"shape": [n, k], "counters": "not zero after the launches"})
        log(f"{n}x{k}: " + ", ".join(f"{d} M={m} {r:.1e}" for (d, m), r in sorted(worst.items()))
            + f"  ({time.time() - t0:.1f}s)")  # fmt: skip
    result["resources"] = _resources(list(frag_w4a16.COMPILED.values()))
    return result


def markdown(result: dict) -> str:
    lines = harness.markdown_heading("Fragment kernel check", result)
    if result["unavailable"]:
        return "\n".join([*lines, f"Not run: {result['unavailable']}", ""])
    cases = result["cases"]
    lines += [
        f"{len(cases)} launches (every tuner candidate x shape x M x fp16/bf16 x symmetric/"
        f"asymmetric), outputs poisoned with NaN first: **{len(result['failures'])} failed**.",
        "",
        f"Dense prefill path (frag_dense): {result.get('dense_unavailable') or 'runs'}.",
        "",
        "| dtype | M | path | worst rel. error | launches |",
        "|---|---|---|---|---|",
    ]
    by: dict[tuple[str, int, str], list[float]] = {}
    for c in cases:
        by.setdefault((c["dtype"], c["m"], c["cfg"]["kind"]), []).append(c["rel"])
    for (d, m, kind), rels in sorted(by.items()):
        lines.append(f"| {d} | {m} | {kind} | {max(rels):.2e} | {len(rels)} |")
    if result["failures"]:
        lines += ["", "Failures:"] + [f"- {f}" for f in result["failures"][:40]]
    if result.get("resources"):
        lines += ["", "Compiled kernels (cuobjdump -res-usage):", "", "```",
                  *result["resources"], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("frag_check.py needs a CUDA device")
    result = harness.result_header()
    result.update(check(parse_shapes(args.shapes), [int(v) for v in args.ms.split(",")]))
    md = markdown(result)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out:
        harness.write_result(f"frag_check_{harness.card_slug(result['device'])}", result, md, out)
    print(md)
    sys.exit(1 if result["failures"] or result["unavailable"] else 0)


if __name__ == "__main__":
    main()
