#!/usr/bin/env bash
# Once, here (no GPU), in the project's venv at the repo root: everything the GPU calls carry
# beyond the working tree, each call within the 64 MiB a call takes (tree included). Nothing
# made here is tracked (.git/info/exclude):
#   .gpu-wheels/1            every package qpipe needs beyond the GPU image (../shared/tools/gpu-wheels),
#                            bitsandbytes cut to its CPU and CUDA 13.0 libraries (the image's
#                            torch is built for CUDA 13.0; the full wheel is 43 MB) and the
#                            folders joined into one
#   .carry/smollm2/part-aa   SmolLM2-135M's GGUF (98 MB, real weights) in two parts, the first as
#   .carry/smollm2/part-ab   large as a call beside the tree takes (bench/carry_smollm2.sh)
#   .gpu/smollm2_tokenizer   SmolLM2's tokenizer (random-weight SmolLM2 rows of the memory table)
# Then bench/gpu/README.md lists the calls, and what each one carries.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
for d in /.gpu-wheels/ /.carry/ /.gpu/; do
  grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
done
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1024 * 1024))  # room for files written here after this script measured the tree
tree_bytes() {  # what a call sends besides its carry: tracked and untracked-not-ignored files
  git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}'
}

[ -d .gpu-wheels ] || ../shared/tools/gpu-wheels
python3 - <<'PY'
import re
import shutil
import zipfile
from pathlib import Path

root = Path(".gpu-wheels")
wheels = sorted(root.glob("*/*.whl"))
one = root / "1"
for wheel in wheels:  # one folder: setup.sh installs whatever folders a call carries
    if wheel.parent != one:
        shutil.move(str(wheel), one / wheel.name)
for folder in root.iterdir():
    if folder != one and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
for wheel in one.glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as zin:
        names = [n for n in zin.namelist() if not n.endswith(".so") or keep.search(n)]
        if len(names) == len(zin.namelist()):
            continue  # already cut
        slim = wheel.with_suffix(".slim")
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
            for name in names:
                if name != record:
                    zout.writestr(zin.getinfo(name), zin.read(name))
            lines = [x for x in zin.read(record).decode().splitlines() if x.split(",")[0] in names]
            zout.writestr(record, "\n".join(lines) + "\n")
    slim.replace(wheel)
PY
[ -d .gpu/smollm2_tokenizer ] || python bench/save_tokenizer.py .gpu/smollm2_tokenizer smollm2

tree=$(tree_bytes)
wheels=$(du -sb .gpu-wheels/1 | cut -f1)
first=$((LIMIT - MARGIN - tree))  # the GGUF's first part fills a call of its own
if [ ! -f .carry/smollm2/part-ab ] || [ "$(stat -c %s .carry/smollm2/part-aa)" -gt "$first" ]; then
  bash bench/carry_smollm2.sh split "$first" >/dev/null
fi
[ -f .carry/smollm2/part-ac ] && { echo "prepare: SmolLM2's GGUF needs more than two calls" >&2; exit 1; }
check() {  # check NAME PATH...: a call's carry beside the tree, against the limit
  local name=$1 size
  shift
  size=$(( $(du -scb "$@" | tail -1 | cut -f1) + tree ))
  printf '%-34s %5.1f MiB of 64%s\n' "$name" "$(echo "$size / 1048576" | bc -l)" \
    "$([ "$size" -gt $((LIMIT - MARGIN)) ] && echo '  TOO LARGE')"
  [ "$size" -le $((LIMIT - MARGIN)) ]
}
echo "prepare: tree $((tree / 1024)) KiB"
check "wheels" .gpu-wheels/1
check "SmolLM2 part 1" .carry/smollm2/part-aa .carry/smollm2/part-aa.sha256 .carry/smollm2/part-aa.size
check "SmolLM2 part 2 + tokenizer" .carry/smollm2/part-ab .gpu
