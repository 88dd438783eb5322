#!/usr/bin/env bash
# End-to-end decoding on the lent GPU, checked on real weights on the same machine. One device
# call per part (each < 9 min; the machine stays warm 30 s between calls):
#   bash bench/gpu/decode.sh checks               SmolLM2's real weights (bench/carry_smollm2.sh):
#        eager and compiled decoding of bf16, W4 and FP8 follow transformers' generate (forced),
#        bf16 with QPIPE_FUSED_NORM=1 too (batch 1), the fused add + RMSNorm kernel's own test,
#        W4's perplexity equals the torch reference's, FP8's is within +3 % of fp32; the FP8
#        layer's GPU tests -> $OUT/gpu_tests_real_weights_<card>.txt (the whole output); FP8
#        decoding at batch 1 runs on the FP8 GEMV, whose own GPU tests are bench/gpu/fp8.sh's
#   bash bench/gpu/decode.sh e2e VARIANTS [BATCHES]   Qwen3-8B's architecture (random weights):
#        compiled and eager tok/s per variant and batch (default batches 1,16) ->
#        $OUT/e2e_<card>_<variants>.{json,md}; bf16 in every call gives the ratio on the machine
#   here, afterwards:  python bench/e2e_decode.py --merge OUT1/e2e_*.json OUT2/e2e_*.json \
#                         --out bench/results --tag <card>
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
part=${1:?usage: decode.sh checks | e2e VARIANTS [BATCHES]}
card=$(python3 -c 'import sys; sys.path.insert(0, "bench"); import harness; print(harness.card_slug())')
case "$part" in
checks)
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
    # the whole output is kept: figures a test prints (perplexities, agreement) are the record
    timeout 540 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rfE -s \
      tests/test_decode_real_gpu.py tests/test_fp8.py tests/test_fused_norm.py 2>&1 | grep --line-buffered -v -E "it/s\]"
  } > "$OUT/gpu_tests_real_weights_$card.txt" 2>&1
  grep -E "passed|failed|perplexity|fp32|FAILED" "$OUT/gpu_tests_real_weights_$card.txt" | tail -20
  ;;
e2e)
  variants=${2:?which variants, e.g. bf16,fp8}
  batches=${3:-1,16}
  timeout "${E2E_TIMEOUT:-540}" python3 bench/e2e_decode.py --out "$OUT" --tag "${card}_${variants//,/_}" \
    --variants "$variants" --batches "$batches" --eager-batches 1 --repeats 2 2>&1 \
    | grep --line-buffered -v -E "it/s\]" | tee "$OUT/e2e_console_${variants//,/_}.txt" | tail -30
  ;;
*) echo "unknown part $part (checks, e2e)"; exit 2 ;;
esac
