#!/usr/bin/env bash
# Tokenize the whole bench pack into the CaseOps layout (val docs first, then train docs; the first
# 2,985 docs are val) with the challenge's CaseOps tokenizer, and print the elapsed seconds.
#
#   bench/tokenize_bench.sh OUT_DIR [more data/prepare.py args]
#   bench/tokenize_bench.sh /tmp/bench_caseops                          # all cores
#   WORKERS=16 bench/tokenize_bench.sh /tmp/bench_caseops
#   bench/tokenize_bench.sh /tmp/prefix --max-train-tokens 2000000      # a quick prefix
#
# The pack is read from $BENCH_DIR (default: .bench/ in the repo root, git-ignored).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [data/prepare.py args]" >&2; exit 2; }
out=$(realpath -m "$1"); shift
cd "$(dirname "$0")/.."
bench=${BENCH_DIR:-.bench}
workers=${WORKERS:-$(nproc)}
for f in "$bench/docs_val.jsonl.xz" "$bench/docs_train.jsonl.xz" \
         "$bench/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"; do
  [ -f "$f" ] || { echo "missing $f (set BENCH_DIR to the bench pack)" >&2; exit 2; }
done
start=$(date +%s.%N)
python data/prepare.py --docs "$bench/docs_val.jsonl.xz" "$bench/docs_train.jsonl.xz" \
  --variant caseops --val-docs 2985 --out "$out" --workers "$workers" --force \
  --tokenizer-model "$bench/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" "$@"
end=$(date +%s.%N)
echo "tokenize_bench: $(awk "BEGIN {printf \"%.1f\", $end - $start}") s elapsed, $workers workers on $(nproc) cores -> $out"
