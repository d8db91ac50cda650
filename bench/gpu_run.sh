#!/usr/bin/env bash
# One GPU benchmark run of train_gpt.py on the bench pack (device side).
#
#   bench/gpu_run.sh NPROC RUN_ID [ENV=VALUE ...]
#
# Expects the bench pack in .bench/ and wheels (brotli) in .whl/. Tokenizes the pack once into
# /tmp/bench_caseops (time printed), then runs torchrun with the given env overrides. The log
# ends up in logs/RUN_ID.txt and, if $OUT is set, is copied there with the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc_=$1 run_id=$2; shift 2
py=$(command -v python3)  # a wrapper, not a symlink: a symlinked venv python loses its venv
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$py" > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
if [ -d .whl ] && ! python3 -c "import brotli" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
[ -f /tmp/bench_caseops/manifest.json ] || WORKERS=$(nproc) bench/tokenize_bench.sh /tmp/bench_caseops
# run the packed file, as a record would: code_bytes is then the counted submission size
python3 tools/pack.py train_gpt.py -o "/tmp/packed_$run_id/train_gpt.py"
env DATA_PATH=/tmp/bench_caseops TOKENIZER_PATH=/tmp/bench_caseops/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \
  RUN_ID="$run_id" ARTIFACT_DIR="/tmp/art_$run_id" "$@" \
  torchrun --standalone --nproc_per_node="$nproc_" "/tmp/packed_$run_id/train_gpt.py"
if [ -n "${OUT:-}" ]; then
  cp "logs/$run_id.txt" "$OUT/" && cp "/tmp/art_$run_id/final_model.ptz" "$OUT/$run_id.ptz" || true
fi
