#!/usr/bin/env bash
# Issue 20's GPU runs, one device call each (results under $OUT):
#   bash bench/gpu_issue20.sh kernels SHAPES TAG   GPU kernel tests + the W4/W8 kernel table
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
