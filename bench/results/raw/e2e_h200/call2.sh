# Device call 2 for issue 7 (nvidia-h200-x2), from the repo root with the wheels in .gpuw/:
# after fusion + grouped attention + prefetched scales/activations + bf16 dequant asm.
# GPU1: GPU tests (full output), GEMV on the decode shapes, eager host cost;
# GPU0: the compiled step's kernel profile (bf16, W4), then eager b1 rows.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuw/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=/tmp/res; mkdir -p $R
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE -x --tb=short tests/test_kernels_triton.py tests/test_fusion.py tests/test_compile.py tests/test_kernels_quant_linear.py > $R/gpu_tests.txt 2>&1
  timeout 60 python3 bench/eager_overhead.py > $R/eager_overhead.txt 2>&1
  timeout 300 python3 bench/gemv_shapes.py --out $R --tag h200 --ms 1,16 > $R/gemv.log 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0
timeout 330 python3 bench/decode_profile.py --out $R --tag h200 --variants w4,bf16 > $R/profile.log 2>&1
timeout 170 python3 bench/e2e_decode.py --out $R --tag h200_eager --variants w4,bf16 --modes eager --eager-new-tokens 24 --repeats 2 > $R/e2e_eager.log 2>&1
wait
cd /tmp && tar czf $OUT/res.tgz res
grep -h "ms/step\|tok/s" $R/profile.log $R/e2e_eager.log; head -3 $R/eager_overhead.txt; tail -n 25 $R/gpu_tests.txt
