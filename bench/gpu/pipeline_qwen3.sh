#!/usr/bin/env bash
# qpipe's pipeline on a lent GPU, Qwen3-8B (random weights): bf16, W4 on the Triton kernels and
# on the torch reference. Run on the device from the repo root, carrying .gpu-wheels/1
# (bench/gpu/prepare.sh) and a Qwen tokenizer folder in .gpu/tokenizer
# (python bench/save_tokenizer.py .gpu/tokenizer):
#   bash bench/gpu/pipeline_qwen3.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu/pipeline_qwen3.sh OUTDIR}
bash "$(dirname "$0")/setup.sh" || exit
export PYTHONPATH=/tmp/site:$PWD QPIPE_OUTPUTS=/tmp/qo PYTHONUNBUFFERED=1 COLUMNS=160
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.csv"
run() { python3 -m qpipe "$@" 2>&1 | grep -v -E "it/s\]" | tee -a "$out/pipeline.log"; }
common=(model=qwen3_8b model.weights=random "model.tokenizer=$PWD/.gpu/tokenizer"
        mlflow.experiment=gpu eval.max_tokens=2048 eval.repeats=2)
run "${common[@]}" quant=none
run "${common[@]}" quant=rtn quant.format=qpipe-w4 quant.group_size=128 kernel=triton
run "${common[@]}" quant=rtn quant.format=qpipe-w4 quant.group_size=128 kernel=torch
python3 -m qpipe.report --experiment gpu --json "$out/gpu_runs.json" --markdown "$out/gpu_runs.md"
