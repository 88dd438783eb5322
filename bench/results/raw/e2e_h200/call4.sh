# Device call 4 for issue 7 (nvidia-h200-x2), from the repo root with the wheels in .gpuw/:
# the final end-to-end rows on the final code. GPU0: W4 compiled b1/b16 then eager in the same
# process, W4 + quantized head b1, W4 eager in a fresh process; GPU1: bf16 compiled b1/b16,
# nf4 b1, bf16 and nf4 eager in fresh processes, then the GPU tests with the time left.
T0=$(date +%s); left() { echo $(( ${1:-550} - $(date +%s) + T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuw/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=/tmp/res; mkdir -p $R
E="python3 bench/e2e_decode.py --out $R --repeats 2"
( export CUDA_VISIBLE_DEVICES=1
  timeout $(left) $E --tag h200_bf16 --variants bf16 --modes compiled --batches 1,16 > $R/bf16.log 2>&1
  timeout $(left) $E --tag h200_nf4 --variants nf4 --modes compiled --batches 1 > $R/nf4.log 2>&1
  timeout $(left) $E --tag h200_bf16_eager --variants bf16 --modes eager > $R/bf16_eager.log 2>&1
  timeout $(left) $E --tag h200_nf4_eager --variants nf4 --modes eager > $R/nf4_eager.log 2>&1
  timeout $(left 565) python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short tests/test_decode_attention.py tests/test_attention.py tests/test_fusion.py tests/test_kernels_triton.py tests/test_compile.py tests/test_kernels_quant_linear.py > $R/gpu_tests.txt 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0
timeout $(left) $E --tag h200_w4 --variants w4 --modes compiled,eager --batches 1,16 > $R/w4.log 2>&1
timeout $(left) $E --tag h200_w4_head --variants w4_head --modes compiled --batches 1 > $R/w4_head.log 2>&1
timeout $(left) $E --tag h200_w4_eager --variants w4 --modes eager > $R/w4_eager.log 2>&1
timeout $(left 565) python3 bench/eager_overhead.py > $R/eager_overhead.txt 2>&1
wait
cd /tmp && tar czf $OUT/res.tgz res
grep -h "tok/s\|FAILED" $R/*.log; head -3 $R/eager_overhead.txt; tail -n 12 $R/gpu_tests.txt
