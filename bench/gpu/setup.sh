#!/usr/bin/env bash
# The lent GPU's image lacks some of qpipe's packages (MLflow, Hydra, bitsandbytes,
# llm-compressor, ...) and SmolLM2's real weights, and a call carries at most 64 MiB: each call
# carries one or two pieces, and this script installs whatever this call brought, once.
#
#   here, first:  ../shared/tools/gpu-wheels            -> .gpu-wheels/1, .gpu-wheels/2, ...
#                 bench/carry_smollm2.sh split 20000000 -> .carry/smollm2/part-aa, -ab, ...
#   each call:    carry some of them; command: bash bench/gpu/setup.sh && <the work>
#   the work:     source bench/gpu/env.sh (PYTHONPATH, outputs) before python
#
# Installed pieces are remembered under /tmp/qpipe-setup (the machine keeps /tmp while it is
# warm): a folder carried again is not installed twice, and a GGUF part not appended twice.
set -euo pipefail
cd "$(dirname "$0")/../.."
done_dir=/tmp/qpipe-setup
mkdir -p "$done_dir" /tmp/site
for folder in .gpu-wheels/*/; do
  [ -d "$folder" ] || continue
  mark="$done_dir/wheels-$(basename "$folder")"
  [ -e "$mark" ] && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$folder"*.whl
  touch "$mark"
  echo "setup: installed $(ls "$folder" | wc -l) wheels from $folder"
done
for part in .carry/smollm2/part-??; do
  [ -f "$part" ] || continue
  mark="$done_dir/smollm2-$(basename "$part")"
  [ -e "$mark" ] && continue
  bash bench/carry_smollm2.sh add "$(basename "$part")"
  touch "$mark"
done
echo "setup: $(ls "$done_dir" | tr '\n' ' ')"
