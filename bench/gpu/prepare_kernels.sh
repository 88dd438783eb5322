#!/usr/bin/env bash
# Once, here (no GPU), in the checkout the device tool sends, inside the project's venv: what
# issue 34's GPU calls carry (bench/gpu/kernels.sh). Nothing here is tracked by git:
#   .peers/marlin/             IST-DASLab/marlin's source (the fetch tool, then git archive)
#   .peers/wheels/             GemLite's wheel (PyPI ships an sdist: pip wheel builds it)
#   .carry/wheels34/           hydra-core, omegaconf, antlr4, gguf (the GPU image lacks them)
#   .carry/smollm2/part-aa,ab  SmolLM2-135M's GGUF in two parts (bench/carry_smollm2.sh)
#   .carry/bnb/                bitsandbytes (43 MB: only for the optional call C)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in /.peers/ /.carry/; do
  grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
if [ ! -f .peers/marlin/marlin/marlin_cuda_kernel.cu ]; then
  echo "missing .peers/marlin: fetch github:IST-DASLab/marlin with the fetch tool, then" >&2
  echo "  mkdir -p .peers/marlin && git -C <mirror> archive HEAD marlin setup.py LICENSE | tar -x -C .peers/marlin" >&2
  exit 1
fi
ls .peers/wheels/gemlite-*.whl >/dev/null 2>&1 || pip wheel -q --no-deps gemlite==0.6.0.post2 -w .peers/wheels
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .carry/wheels34
python3 -m pip download -q --no-deps "${plat[@]}" -d .carry/wheels34 \
  hydra-core==1.3.8 omegaconf==2.3.1 gguf==0.19.0
ls .carry/wheels34/antlr4_python3_runtime-*.whl >/dev/null 2>&1 \
  || pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .carry/wheels34
[ -f .carry/smollm2/part-ab ] || bash bench/carry_smollm2.sh split
if [ "${1:-}" = "--bnb" ]; then
  mkdir -p .carry/bnb
  python3 -m pip download -q --no-deps "${plat[@]}" -d .carry/bnb bitsandbytes==0.50.2
fi
du -sh .peers .carry/* 2>/dev/null
echo "tracked files: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
