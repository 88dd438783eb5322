# Device call 3 for issue 7 (nvidia-h200-x2), from the repo root with the wheels in .gpuw/:
# the end-to-end table. GPU0: W4 and W4 + quantized lm_head, then the W4 step's profile;
# GPU1: the GPU tests, then bf16 and bitsandbytes nf4. Same harness, same host, same time.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuw/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=/tmp/res; mkdir -p $R
( export CUDA_VISIBLE_DEVICES=1
  timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short tests/test_kernels_triton.py tests/test_fusion.py tests/test_compile.py tests/test_attention.py tests/test_decode_attention.py tests/test_kernels_quant_linear.py > $R/gpu_tests.txt 2>&1
  timeout 60 python3 bench/eager_overhead.py > $R/eager_overhead.txt 2>&1
  timeout 330 python3 bench/e2e_decode.py --out $R --tag h200_gpu1 --variants bf16,nf4 --batches 1,16 --repeats 2 > $R/e2e_gpu1.log 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0
timeout 420 python3 bench/e2e_decode.py --out $R --tag h200_gpu0 --variants w4,w4_head --batches 1,16 --repeats 2 > $R/e2e_gpu0.log 2>&1
timeout 120 python3 bench/decode_profile.py --out $R --tag h200 --variants w4 > $R/profile.log 2>&1
wait
cd /tmp && tar czf $OUT/res.tgz res
grep -h "tok/s\|FAILED\|ms/step" $R/e2e_gpu0.log $R/e2e_gpu1.log $R/profile.log; head -3 $R/eager_overhead.txt; tail -n 30 $R/gpu_tests.txt
