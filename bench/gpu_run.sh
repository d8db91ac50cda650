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
. bench/gpu_env.sh
# run the packed file, as a record would: code_bytes is then the counted submission size
python3 tools/pack.py train_gpt.py -o "/tmp/packed_$run_id/train_gpt.py"
env RUN_ID="$run_id" ARTIFACT_DIR="/tmp/art_$run_id" "$@" \
  torchrun --standalone --nproc_per_node="$nproc_" "/tmp/packed_$run_id/train_gpt.py"
if [ -n "${OUT:-}" ]; then
  cp "logs/$run_id.txt" "$OUT/" && cp "/tmp/art_$run_id/final_model.ptz" "$OUT/$run_id.ptz" || true
fi
