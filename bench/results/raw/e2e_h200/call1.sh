# Device call 1 for issue 7 (nvidia-h200-x2), from the repo root with the wheels in .gpuw/:
# GPU0: where a compiled decode step's time goes (bf16, W4 fused), then eager b1 rows;
# GPU1: the GPU tests, the GEMV on the decode shapes (row vs word x-scaling), eager host cost.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuw/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=/tmp/res; mkdir -p $R
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 bash bench/gpu_tests.sh $R/gpu_tests.txt > /dev/null 2>&1
  timeout 280 python3 bench/gemv_shapes.py --out $R --tag h200 --ms 1,16 > $R/gemv.log 2>&1
  timeout 60 python3 bench/eager_overhead.py > $R/eager_overhead.txt 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0
timeout 330 python3 bench/decode_profile.py --out $R --tag h200 --variants bf16,w4 > $R/profile.log 2>&1
timeout 200 python3 bench/e2e_decode.py --out $R --tag h200_eager --variants w4,bf16 --modes eager --eager-new-tokens 24 --repeats 2 > $R/e2e_eager.log 2>&1
wait
cd /tmp && tar czf $OUT/res.tgz res
tail -n 4 $R/profile.log $R/e2e_eager.log $R/gemv.log $R/eager_overhead.txt; tail -n 6 $R/gpu_tests.txt
