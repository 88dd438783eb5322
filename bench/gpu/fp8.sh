#!/usr/bin/env bash
# quant=fp8's decode GEMV (qpipe/kernels/triton_fp8.py) on the lent GPU, one device call
# (< 9 min), carrying what bench/gpu/setup.sh installs (.gpu-wheels/*):
#   command: bash bench/gpu/setup.sh && bash bench/gpu/fp8.sh
#   1. its GPU tests (tests/test_e4m3_gemv.py, tests/test_fp8.py -m gpu: every tuner candidate
#      against the reference, CUDA-graph capture, torch.compile reduce-overhead, the kernel
#      name) -> $OUT/gpu_tests_e4m3_gemv_<card>.txt
#   2. the kernel table: fp16 cuBLAS, qpipe_w8, fp8 (as Fp8Linear runs it: the GEMV at
#      M <= 4, torch._scaled_mm above) and fp8_w8a8 (_scaled_mm at every M), issue 34's five
#      shapes then issue 20's eight, M = 1, 4, 16, 64 -> $OUT/kernels_<card>_fp8.{json,md}
# Then the decode parts, a call each: bash bench/gpu/decode.sh checks (SmolLM2 real weights:
# FP8 eager and compiled decoding follow generate, batch 1 on the GEMV) and
# bash bench/gpu/decode.sh e2e bf16,fp8,fp8_w8a8 1,16 (tok/s; fp8 at batch 1 is the GEMV).
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
export QPIPE_TUNE_CACHE=/tmp/qpipe_tune_fp8.json
START=$(date +%s)
card=$(python3 -c 'import sys; sys.path.insert(0, "bench"); import harness; print(harness.card_slug())')
{
  echo "# python -m pytest -m gpu tests/test_e4m3_gemv.py tests/test_fp8.py (bench/gpu/fp8.sh), $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_capability(0))'
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    tests/test_e4m3_gemv.py tests/test_fp8.py 2>&1 | grep --line-buffered -v -E "^\s*$|it/s\]"
} 2>&1 | tee "$OUT/gpu_tests_e4m3_gemv_$card.txt" | tail -15
# the table: no new shape after the budget (the files keep every shape done)
budget=$((500 - ($(date +%s) - START)))
timeout $((budget + 60)) python3 bench/kernel_bench.py --out "$OUT" --tag fp8 \
  --shapes issue34,issue20 --ms 1,4,16,64 --impls fp16,qpipe_w8,fp8,fp8_w8a8 \
  --budget-s "$budget" 2>&1 | tail -70
