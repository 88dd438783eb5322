#!/usr/bin/env bash
# The GPU-marked tests on a lent GPU, recorded with the device and versions, so that
# "N GPU tests passed" points at a committed file:  bash bench/gpu/tests.sh OUTFILE
set -uo pipefail
out=${1:?usage: gpu/tests.sh OUTFILE}
{
  echo "# python -m pytest -m gpu (bench/gpu/tests.sh), $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__)'
  python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    tests/test_kernels_triton.py tests/test_kernels_quant_linear.py tests/test_kernels_formats.py \
    tests/test_legacy_checkpoints.py tests/test_compile.py tests/test_fusion.py 2>&1 | tail -40
} | tee "$out"
