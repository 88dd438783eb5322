#!/usr/bin/env bash
# End-to-end decoding on the lent GPU, checked on real weights in the same call:
#   bash bench/gpu/decode.sh [VARIANTS] [BATCHES]     (defaults: bf16,fp8,w4  1,16)
# 1. SmolLM2's real weights (bench/carry_smollm2.sh): eager and compiled decoding of bf16, W4
#    and FP8 follow transformers' generate (forced), W4's perplexity equals the torch
#    reference's, FP8's is within +3 % of fp32 -> $OUT/real_weights.txt
# 2. Qwen3-8B's architecture (random weights): compiled and eager tok/s per variant and batch,
#    against bf16 from the same call -> $OUT/e2e_<card>.{json,md}
# Each part writes its own file; a failing part does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
variants=${1:-bf16,fp8,w4}
batches=${2:-1,16}
card=$(python3 -c 'import sys; sys.path.insert(0, "bench"); import harness; print(harness.card_slug())')
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE -s \
    tests/test_decode_real_gpu.py tests/test_fp8.py 2>&1 | grep -v -E "it/s\]" | tail -40
} > "$OUT/real_weights_$card.txt" 2>&1
tail -8 "$OUT/real_weights_$card.txt"
timeout 350 python3 bench/e2e_decode.py --out "$OUT" --tag "$card" --variants "$variants" \
  --batches "$batches" --eager-batches 1 --repeats 2 2>&1 | grep -v -E "it/s\]" | tail -30
