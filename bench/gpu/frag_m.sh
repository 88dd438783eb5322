#!/usr/bin/env bash
# Issue 34, layout v3 at every M: the fragment order (qpipe_frag: the fragment kernel, and the
# dense prefill path, frag_dense, where the tuner finds it faster) against the v2 tiles on the
# Triton kernels (qpipe_v2), fp16 cuBLAS beside them, in one device call (< 9 min, no carry:
# the image's torch and Triton are all it needs).
#
#   command: bash bench/gpu/frag_m.sh                       # M = 1..256 on issue 20's shapes
#            bash bench/gpu/frag_m.sh 512,1024,2048,4096    # prefill sizes, the same shapes
#            (optional 2nd argument: the shapes, default issue20; kernel_bench.py --shapes)
#
# Parts, each with its own time limit and log, packed into $OUT/frag_m.tgz after each part:
#   1. the fragment kernel's and the dense path's GPU tests (self-checks, every tuner candidate
#      at M up to 130 against the reference, graphs, compile);
#   2. frag_check on two shapes at the call's M values (every candidate, fp16/bf16, zeros or
#      not: correctness of every configuration the tuner may pick);
#   3. the kernel table: fp16, qpipe_frag, qpipe_v2 at the call's M values; its markdown names
#      each row's tuned launch (kind=frag or kind=dense, chunk_rows), so the crossover M per
#      shape is read off the table.
# What must show: in kernels_<card>_fragm.md, qpipe_frag x >= qpipe_v2 x at every M on every
# shape (the condition for making v3 the default); frag_check 0 failed; the GPU tests passed.
set -uo pipefail
MS=${1:-1,2,4,8,16,32,64,128,256}
SHAPES=${2:-issue20}
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out_fragm}
W=/tmp/fragm_round
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD QPIPE_OUTPUTS=/tmp/qo QPIPE_KERNEL_CACHE=/tmp/qpipe_cubin \
  QPIPE_TUNE_CACHE=/tmp/qpipe_tune_fragm.json QPIPE_FRAG=1
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
exec > >(tee -a "$OUT/frag_m.log") 2>&1
save() { tar czf "$OUT/frag_m.tgz" -C "$W" . 2>/dev/null; }
left() { echo $((DEADLINE - ($(date +%s) - START))); }
part() {  # part NAME LIMIT_S command...
  local name=$1 limit=$2 rest
  shift 2
  rest=$(left)
  [ "$rest" -lt 20 ] && { echo "== $name: skipped, $rest s left"; return; }
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (limit ${limit} s, at $(($(date +%s) - START)) s)"
  timeout "$limit" "$@" >"$W/$name.log" 2>&1
  echo "== $name: rc=$?"
  grep -v -E "^\s*$|it/s\]" "$W/$name.log" | tail -"${TAIL:-8}"
  save
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} | tee "$W/env.txt"
part gpu_tests 90 python3 -m pytest -q -m gpu -p no:cacheprovider --noconftest -rfE \
  tests/test_frag_kernel.py
part frag_check 90 python3 bench/frag_check.py --out "$W" --shapes 4096x4096,28672x8192 --ms "$MS"
BUDGET=$(($(left) - 60))
part kernels $(($(left) - 5)) python3 bench/kernel_bench.py --out "$W" --tag fragm \
  --shapes "$SHAPES" --ms "$MS" --budget-s "$BUDGET" --impls fp16,qpipe_frag,qpipe_v2
cat "$W"/kernels_*_fragm.md 2>/dev/null | grep -v "^$"
echo "== done in $(($(date +%s) - START)) s"
save
