"""Instructions per weight in the main loops of qpipe's kernels, read from sm_90 SASS compiled
on a machine without a GPU (a tuning aid: what a change costs before a GPU call measures it).

    QPIPE_NVRTC=<libnvrtc.so.13> python bench/sass_loop.py [--out DIR]

The fragment kernel is compiled by NVRTC (``cuda_rtc``), the W8A16 and FP8 GEMVs by Triton for a
``cuda:90`` target (with the divisibility a real launch specializes on); ``cuobjdump`` is
Triton's copy or the one on PATH. The loop is the longest span between a backward branch and its
target; its instructions (a static count: a predicated group-end step is counted on every
unrolled chunk although it runs on some) over the weights a thread streams per iteration.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402


def cuobjdump() -> str:
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if not found:
        sys.exit("needs cuobjdump (Triton's package carries one)")
    return found


def _lines(cubin: bytes, function: str | None = None) -> tuple[list[str], str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        cmd = [cuobjdump(), "-sass", *(["-fun", function] if function else []), f.name]
        sass = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True)
    usage = [ln.strip() for ln in res.stdout.splitlines() if "REG:" in ln]
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    return lines, (usage[-1].split(" STACK")[0] if usage else "?")


def _addr(line: str) -> int:
    return int(re.search(r"/\*([0-9a-f]{4})\*/", line).group(1), 16)


def loop_body(lines: list[str]) -> list[str]:
    """The main loop: the longest span from a backward branch's target to the branch (the
    split-K epilogue's loops are short)."""
    body: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA (0x[0-9a-f]+)", line)
        if m and int(m.group(1), 16) < _addr(line):
            start = next(j for j, x in enumerate(lines) if _addr(x) == int(m.group(1), 16))
            if i + 1 - start > len(body):
                body = lines[start : i + 1]
    return body


def _op(line: str) -> str:
    parts = line.split()
    return parts[2] if parts[1].startswith("@") else parts[1]


def frag_rows() -> list[dict]:
    from qpipe.kernels import cuda_rtc, frag_w4a16

    rows = []
    for t, shapes in frag_w4a16._SHAPES.items():
        for r, w, p in shapes[:2]:
            cfg = frag_w4a16.FragConfig(t=t, r=r, warps=w, prefetch=p)
            for bf16 in (False, True):
                expr = frag_w4a16._expr(cfg, bf16, True, False)
                cubin, lowered = cuda_rtc.compile_cubin(frag_w4a16._source(), [expr], "90")
                lines, usage = _lines(cubin, lowered[expr])
                body = loop_body(lines)
                weights = p * r * 32  # int4 weights per lane per loop iteration
                ops = collections.Counter(_op(ln) for ln in body)
                rows.append({"kernel": "w4 frag", "config": f"t={t} r={r} warps={w} prefetch={p}",
                             "dtype": "bf16" if bf16 else "fp16", "usage": usage,
                             "loop": len(body), "per_weight": len(body) / weights,
                             "mma": sum(v for k, v in ops.items() if k.startswith("HMMA")),
                             "top": ops.most_common(6)})  # fmt: skip
    return rows


def w8_rows() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qpipe.kernels.triton_w8a16 import _w8_gemv_kernel

    sig = {"x_ptr": "*fp16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16",
           "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "G": "i32", "stride_xm": "i32", "stride_ym": "i32", "SPLIT_K": "i32"}  # fmt: skip
    div16 = ["x_ptr", "q_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "N", "K",
             "stride_xm", "stride_ym"]  # fmt: skip
    rows = []
    for bm, bn, warps in ((1, 64, 4), (1, 128, 4), (4, 32, 4)):
        consts = {"GS": 128, "HAS_Z": False, "HAS_BIAS": False, "BLOCK_M": bm, "BLOCK_N": bn,
                  "BLOCK_K": 128, "USE_ASM": True}  # fmt: skip
        full = {**sig, **{k: "constexpr" for k in consts}}
        names = list(full)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
        src = ASTSource(fn=_w8_gemv_kernel, signature=full, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 1})  # fmt: skip
        lines, usage = _lines(k.asm["cubin"])
        body = loop_body(lines)
        weights = bn * 128 // (warps * 32)  # int8 weights per thread per iteration
        ops = collections.Counter(_op(ln) for ln in body)
        rows.append({"kernel": "w8 gemv", "config": f"block_m={bm} block_n={bn} warps={warps}",
                     "dtype": "fp16", "usage": usage, "loop": len(body),
                     "per_weight": len(body) / weights, "mma": 0, "top": ops.most_common(6)})  # fmt: skip
    return rows


def fp8_rows() -> list[dict]:
    """The FP8 GEMV (``triton_fp8``): e4m3 bytes dequantized by integer bit moves, fp32 FMAs;
    bf16 activations (fp16 compiles to the same loop: they are widened to fp32 at the load)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qpipe.kernels.triton_fp8 import _e4m3_gemv_kernel

    sig = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp32", "b_ptr": "*fp32",
           "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "SPLIT_K": "i32"}  # fmt: skip
    div16 = ["x_ptr", "q_ptr", "s_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "N", "K",
             "stride_xm", "stride_ym"]  # fmt: skip
    rows = []
    for bm, bn, bk, warps in ((1, 64, 128, 4), (1, 128, 128, 4), (2, 64, 128, 4),
                              (4, 64, 128, 4), (4, 32, 128, 4)):  # fmt: skip
        consts = {"HAS_BIAS": False, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                  "USE_ASM": True}  # fmt: skip
        full = {**sig, **{k: "constexpr" for k in consts}}
        names = list(full)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
        src = ASTSource(fn=_e4m3_gemv_kernel, signature=full, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 1})  # fmt: skip
        lines, usage = _lines(k.asm["cubin"])
        body = loop_body(lines)
        weights = bn * bk // (warps * 32)  # e4m3 weights per thread per iteration
        ops = collections.Counter(_op(ln) for ln in body)
        rows.append({"kernel": "fp8 gemv", "config": f"block_m={bm} block_n={bn} warps={warps}",
                     "dtype": "bf16", "usage": usage, "loop": len(body),
                     "per_weight": len(body) / weights, "mma": 0, "top": ops.most_common(6)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = harness.result_header(rows=frag_rows() + w8_rows() + fp8_rows())
    lines = harness.markdown_heading(
        "Main-loop SASS of the W4 fragment kernel and the W8 and FP8 GEMVs", result
    )
    lines += [__doc__.split("\n\n")[2].strip(), "",
              "| kernel | config | dtype | registers | loop instructions | per weight | MMAs |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['usage']} | "
                     f"{r['loop']} | {r['per_weight']:.2f} | {r['mma']} |")  # fmt: skip
    if args.out:
        harness.write_result("sass_loop_sm90", result, lines, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
