#!/usr/bin/env bash
# Issue 33, device call (b1) and (b2): the memory table on the lent GPU, estimate against the
# allocator's peak and NVML's total per row, pipeline=fit (quantize, load, validate_vram: the
# stages that measure memory; the benchmark stage adds nothing to these figures). Two calls of
# < 9 min each on the same warm machine (they share /tmp/qo: InternVL's random-weight folder,
# written once for the none and bitsandbytes rows):
#   OUT=... bash bench/gpu/memory.sh 1   # InternVL none, bnb_nf4, bnb_int8, fp8 + SmolLM2's six
#   OUT=... bash bench/gpu/memory.sh 2   # InternVL rtn, gptq, awq
# then, here: python bench/memory_table.py report OUT1 OUT2 --out bench/results
# Writes $OUT/memory_<card>.{json,md}, $OUT/rows.json, $OUT/logs_tail.txt.
#
# Wheels as for bench/gpu/headline.sh; after the headline ran, part 2 needs only
# ROWS=internvl:gptq (the headline's awq and rtn runs hold the others' allocator and NVML
# errors). SmolLM2 runs its architecture with random weights (the memory is the same) and needs
# its tokenizer carried in .gpu/smollm2_tokenizer (bench/gpu/prepare.sh makes it).
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
part=${1:?which part: 1 or 2}
mkdir -p "$out"
bash "$(dirname "$0")/setup.sh" || exit  # the carried wheels, installed once per machine
export PYTHONPATH=/tmp/site:$PWD QPIPE_OUTPUTS=${QPIPE_OUTPUTS:-/tmp/qo} PYTHONUNBUFFERED=1 COLUMNS=160
tok=qwen
[ -d .gpu/tokenizer ] && tok=$PWD/.gpu/tokenizer
case "$part" in
1)
  rows=(internvl:none internvl:bnb_nf4 internvl:bnb_int8 internvl:fp8)
  if [ -d .gpu/smollm2_tokenizer ]; then
    rows+=(smollm2:none smollm2:bnb_nf4 smollm2:bnb_int8 smollm2:rtn smollm2:gptq smollm2:awq)
  else
    echo "no .gpu/smollm2_tokenizer: SmolLM2 rows left out" >&2
  fi
  ;;
2) rows=(internvl:rtn internvl:gptq internvl:awq) ;;
*) echo "part must be 1 or 2" >&2; exit 2 ;;
esac
# ROWS/SET: a check of this script's logic elsewhere (ROWS=smollm2:rtn on CPU)
[ -n "${ROWS:-}" ] && read -r -a rows <<<"$ROWS"
read -r -a extra <<<"${SET:-}"
python3 bench/memory_table.py run "$out" --rows "${rows[@]}" --internvl-tokenizer "$tok" \
  --set "${extra[@]}" \
  --smollm2 "$PWD/.gpu/smollm2_tokenizer" --experiment "memory_gpu_$part" \
  --row-timeout "${ROW_TIMEOUT:-300}" --budget "${BUDGET:-500}"
