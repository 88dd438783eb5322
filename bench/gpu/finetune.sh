#!/usr/bin/env bash
# Issue 32's measured table (bench/finetune_memory.py) in two GPU calls of under 9 minutes, on
# one warm machine, after bench/gpu/prepare.sh here (what each call carries: bench/gpu/README.md):
#   call 1  bash bench/gpu/setup.sh && bash bench/gpu/finetune.sh 1
#           Qwen3-8B (random weights): LoRA, QLoRA, full + 8-bit AdamW, ± checkpointing,
#           batch 1 then 4
#   call 2  bash bench/gpu/setup.sh && bash bench/gpu/finetune.sh 2
#           InternVL3.5-8B LoRA/QLoRA, SmolLM2's real weights full/LoRA/QLoRA (its GGUF
#           assembled by setup.sh), ZeRO-2 with the optimizer offloaded (DeepSpeed's CPU Adam
#           built in the background with the machine's nvcc and ninja)
#   then here: python bench/finetune_memory.py report OUT1 OUT2 --stem finetune_<card>
# Each call writes $OUT/rows.jsonl (a line per row as it ends: a call cut short keeps them),
# $OUT/log.txt, and for call 2 $OUT/cpu_adam_build.log. `check` runs the tiny rows on CPU.
# BUDGET (s) bounds the rows; QPIPE_OUTPUTS may name a private outputs folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
call=${1:?usage: finetune.sh 1|2|check}
case "$call" in
  1) group=qwen; budget=${BUDGET:-470} ;;
  2) group=vlm_smol; budget=${BUDGET:-470} ;;
  check) group=tiny; budget=${BUDGET:-600} ;;
  *) echo "unknown call $call (1, 2 or check)" >&2; exit 2 ;;
esac
if [ "$call" != check ]; then
  export QPIPE_OUTPUTS=${QPIPE_OUTPUTS:-/tmp/qo_finetune}  # its own: call 1 removes it at the end
  source bench/gpu/env.sh
  export FT_RUNS=/tmp/finetune_runs
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
fi
out=${OUT:-/tmp/finetune_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 COLUMNS=160 MPLBACKEND=Agg
python3 bench/finetune_memory.py run "$out" --group "${FT_GROUP:-$group}" --budget "$budget" 2>&1 \
  | tee -a "$out/log.txt"
code=${PIPESTATUS[0]}
# call 1's 8B folders (22 GB) are not call 2's: the 64 GiB disk holds call 2's beside the rest
[ "$call" = 1 ] && rm -rf "${QPIPE_OUTPUTS:?}" "$FT_RUNS"
exit "$code"
