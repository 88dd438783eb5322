# The device call that made the rtn/gptq/awq rows (call 3) and the OOM result; calls 1-2 ran the same script with other QA/QB rows.
# From the repo root, with the wheels of ../shared/tools/gpu-wheels copied into .gpuw/ (bitsandbytes trimmed to its cu130 library):
#   QA="rtn awq" QB="gptq" OOMT=220 BUDGET_END=470 bash .gpuw/call3.sh   (device kind nvidia-h200-x2)
# call 3 on nvidia-h200-x2: GPU1 = CUDA OOM faults (#11) then rows QB; GPU0 = InternVL rows QA (#8)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuw/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=160 MPLBACKEND=Agg
R=/tmp/res; mkdir -p $R/oom
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/nvidia-smi.csv
( export CUDA_VISIBLE_DEVICES=1; timeout ${OOMT:-300} python3 bench/gpu_oom.py $R/oom --outputs /tmp/qo-oom > $R/oom/log.txt 2>&1
  while [ ! -f /tmp/materialized ]; do sleep 5; done
  mkdir -p /tmp/qoB/cache && cp -al /tmp/qoA/cache/models /tmp/qoB/cache/
  LEFT=$(( ${BUDGET_END:-570} - $(date +%s) + T0 ))
  QPIPE_OUTPUTS=/tmp/qoB python3 bench/internvl_h100.py run $R/ivlB --tokenizer qwen --decode compiled --quant $QB --row-timeout 400 --budget $LEFT > $R/ivlB.log 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0 QPIPE_OUTPUTS=/tmp/qoA
python3 - > $R/materialize.log 2>&1 <<'PY'
import time; t=time.time()
from hydra import compose, initialize_config_dir
from qpipe.config import CONF_DIR, normalize_overrides
from qpipe.models import materialize
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=normalize_overrides(["+model=internvl", "model.weights=random", "model.tokenizer=qwen"]))
    print(materialize(cfg.model), time.time()-t)
PY
touch /tmp/materialized
LEFT=$(( ${BUDGET_END:-570} - $(date +%s) + T0 ))
python3 bench/internvl_h100.py run $R/ivlA --tokenizer qwen --decode compiled --quant $QA --row-timeout 400 --budget $LEFT > $R/ivlA.log 2>&1
wait
cd /tmp && tar czf $OUT/res.tgz res; cp $R/oom/*.md $R/ivlA/internvl_h100.md $OUT/ 2>/dev/null; cp $R/ivlB/internvl_h100.md $OUT/ivlB.md 2>/dev/null
tail -n 3 $R/oom/log.txt $R/materialize.log $R/ivlA.log $R/ivlB.log
