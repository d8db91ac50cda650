#!/usr/bin/env bash
# The measurements of one device session, in stages that each fit one 10-minute device call
# (long jobs start detached and are collected by the next stage). Device side, repo root, with
# the bench pack in .bench/, the brotli wheel in .whl/ and the old code to compare in .old/
# (`git show REV:train_gpt.py > .old/train_gpt.py; cp -r bench .old/`).
#
#   bench/device_session.sh check     # GPU tests, bench_step old vs new, start the 300 s run
#   bench/device_session.sh r300      # wait for the 300 s run, then start the proxy runs
#   bench/device_session.sh proxy     # wait for the proxy runs, then the paired LQER A/B
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" logs
py=$(command -v python3)
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$py" > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import brotli" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export DATA_PATH=/tmp/bench_caseops
export TOKENIZER_PATH=/tmp/bench_caseops/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model

wait_for() {  # wait_for FILE SECONDS: until FILE exists
  for _ in $(seq "$2"); do [ -e "$1" ] && return 0; sleep 1; done; return 1
}

case "${1:-}" in
check)
  [ -f /tmp/bench_caseops/manifest.json ] || \
    (WORKERS=10 setsid bench/tokenize_bench.sh /tmp/bench_caseops > /tmp/tok.log 2>&1; touch /tmp/tok.done) &
  python -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  for code in .old .; do  # same machine, same call: old code, then new
    echo "== bench_step $code"
    (cd $code && BENCH_BATCHES=786432 BENCH_STEPS=8 python bench/bench_step.py) 2>&1 | grep -v '^$' | tail -4
  done | tee "$OUT/bench_ab.txt"
  wait_for /tmp/tok.done 400 || wait_for /tmp/bench_caseops/manifest.json 1; tail -1 /tmp/tok.log
  setsid env MAX_WALLCLOCK_SECONDS=300 TTT_ENABLED=0 TRAIN_LOG_EVERY=50 SAVE_PREQUANT=1 \
    bash -c 'bench/gpu_run.sh 1 r300 > /tmp/r300.out 2>&1; touch /tmp/r300.done' &
  sleep 5; tail -3 /tmp/r300.out ;;
r300)
  wait_for /tmp/r300.done 560; cp logs/r300.txt "$OUT/" 2>/dev/null; tail -4 /tmp/r300.out
  grep -E 'stopping|val_bpb|artifact:|record_eligible' logs/r300.txt | cut -c1-300
  shift; setsid bash -c "python bench/proxy.py $* > /tmp/proxy.out 2>&1; touch /tmp/proxy.done" &
  sleep 2 ;;
proxy)
  wait_for /tmp/proxy.done 480; cp /tmp/proxy.out "$OUT/"; cp logs/proxy_*.txt "$OUT/" 2>/dev/null
  tail -12 /tmp/proxy.out
  python tools/ab.py --checkpoint /tmp/art_proxy_base/final_model.pt --variant base: \
    --variant nolqer:LQER_ENABLED=0 --json "$OUT/ab_lqer.json" 2>&1 | tail -6 ;;
*) echo "usage: $0 check|r300 PROXY_ARGS|proxy" >&2; exit 2 ;;
esac
