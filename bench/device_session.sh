#!/usr/bin/env bash
# The measurements of one device session, in stages that each fit one 10-minute device call
# (long jobs start detached; the next call, made within 30 s, collects them). Device side, repo
# root, with the bench pack in .bench/, the brotli wheel in .whl/ and the old code to compare in
# .old/ (`mkdir -p .old && git archive REV train_gpt.py bench | tar -x -C .old`).
#
#   bench/device_session.sh check     # GPU tests, then bench_step old vs new (same call)   ~5 min
#   bench/device_session.sh stepab    # bench_step old vs new, bench shards; new at the proxy batch ~5 min
#   bench/device_session.sh proxy N [quant|eval|stepab]  # base, seed 1, no attention gate, no SmearGate
#                                     # at N proxy steps (4 runs on the GPU), then ...  500 steps ~18 min
#   bench/device_session.sh smear     # 3 more 500-step runs: SmearGate on/off over 3 seeds    ~16 min
#   bench/device_session.sh base N [quant|eval|stepab]   # the base alone at N proxy steps, then ...
#   bench/device_session.sh sweep N [quant|eval|stepab]  # loop vs no loop at N proxy steps, then ...
#   bench/device_session.sh r300      # tokenize, start the 300 s run (TTT off), wait        ~9 min
#   bench/device_session.sh levers [CK [quant|eval]]  # paired lever A/Bs on a checkpoint, detached
#   bench/device_session.sh levers .art/base500_base.ptz eval  # eval levers on an artifact an earlier
#                                     # session brought back (every call returns /tmp/art_*_base's
#                                     # final_model.ptz as $OUT/PREFIX_base.ptz): no training. Carry it in
#                                     # .art/ with the slim val pack .bench_eval/ as BENCH_DIR (the full
#                                     # pack and an artifact pass the 64 MiB carry): val docs, the CaseOps
#                                     # tokenizer and 2,000 train docs (the val shards come out identical):
#     mkdir -p .bench_eval/tokenizers && cp ../shared/bench/docs_val.jsonl.xz .bench_eval/ &&
#     cp ../shared/bench/tokenizers/*caseops*.model .bench_eval/tokenizers/ &&
#     xz -dc ../shared/bench/docs_train.jsonl.xz | head -2000 | xz > .bench_eval/docs_train.jsonl.xz
#     (device) BENCH_DIR=.bench_eval bench/device_session.sh levers .art/base500_base.ptz eval
#   bench/device_session.sh wait [S]  # wait (at most S s) for the running job, print its tail
# Every stage ends by packing the logs, job outputs and JSON it finds into $OUT/collected.tgz and
# copying the base runs' artifacts to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" logs
. bench/gpu_env.sh > /tmp/env.log 2>&1 || { cat /tmp/env.log; exit 1; }

wait_for() {  # wait_for FILE SECONDS: until FILE exists
  for _ in $(seq "$2"); do [ -e "$1" ] && return 0; sleep 1; done; return 1
}
detached() {  # detached NAME CMD...: run CMD in its own session, /tmp/NAME.out, /tmp/NAME.done
  rm -f "/tmp/$1.done"; setsid bash -c "${*:2} > /tmp/$1.out 2>&1; touch /tmp/$1.done" &
  echo "$1" > /tmp/job
}

collect() {  # one tarball (a call brings back only a few files), and the base runs' artifacts
  tar czf "$OUT/collected.tgz" --ignore-failed-read /tmp/*.out /tmp/*.json /tmp/proxy logs .old/logs 2>/dev/null
  for f in /tmp/art_*_base/final_model.ptz; do
    [ -f "$f" ] && d=${f%/final_model.ptz} && cp "$f" "$OUT/${d#/tmp/art_}.ptz"
  done; true
}
trap collect EXIT
gpu_tests() { python -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"; }
bench_step() {  # bench_step CODE_DIR BATCH: on the bench shards, the same tokens for every version
  echo "== bench_step $1 at $2 tokens"
  (cd "$1" && BENCH_DATA=$DATA_PATH BENCH_BATCHES=$2 BENCH_STEPS=8 python bench/bench_step.py) 2>&1 |
    grep -v '^$' | tail -4
}
chain_after() {  # chain_after PREFIX [quant|eval|stepab]: the job to run after proxy.py's runs
  case "${2:-}" in  # the levers read the base run's checkpoint, where proxy.py's ARTIFACT_DIR puts it
  quant|eval) echo "bench/device_session.sh levers /tmp/art_$1_base/final_model.pt $2" ;;
  stepab) echo "bench/device_session.sh stepab" ;;
  "") echo ":" ;;
  *) echo "then quant|eval|stepab, not $2" >&2; return 2 ;;
  esac
}
step_ab() {  # same machine, same call: old code, then new; then new at the proxy batch (its loop
  # on / off ratio sets the no-loop arm's steps)
  { bench_step .old 786432; bench_step . 786432; bench_step . 262144; } | tee "$OUT/bench_ab.txt"
}

case "${1:-}" in
check) gpu_tests; step_ab ;;
stepab) step_ab ;;
proxy)  # proxy N [quant|eval|stepab]: issue 14's lever ranking at N proxy steps (two base seeds
  # for the noise; the depth loop has its own stage, sweep), then what the third argument asks
  n=${2:?proxy N}; chain=$(chain_after "proxy$n" "${3:-}") || exit 2
  detached proxy "{" python bench/proxy.py --iterations "$n" --prefix "proxy$n" --out /tmp/proxy --common \
    TRAIN_LOG_EVERY=50 MUON_MOMENTUM_WARMUP_FRAC=0.24 \
    --variant base: --variant seed1:SEED=1 --variant nogate:ATTN_GATE=none \
    --variant nosmear:SMEAR_GATE_ENABLED=0 ";" "$chain" ";" "}"
  wait_for /tmp/proxy.done $((560 - SECONDS)); tail -8 /tmp/proxy.out ;;
smear)  # smear 500: SmearGate's place by seeds. Seed 42 of both arms and the base's seed 1 are in
  # bench/logs/proxy500_*.txt (9ca0086, AWQ-lite off then): these add the base's seed 2 and SmearGate
  # off at seeds 1 and 2, AWQ-lite off as there, for three seeds per arm (`tools/seeds.py stats
  # --metric bpb --allow-mixed config_hash source_sha256`: the training math is 9ca0086's, the
  # retired PARALLEL_LANE1_SKIP field moves the hash)
  detached smear python bench/proxy.py --iterations 500 --prefix smear500 --out /tmp/proxy --common \
    TRAIN_LOG_EVERY=50 MUON_MOMENTUM_WARMUP_FRAC=0.24 AWQ_LITE_GROUPS=0 --variant base_s2:SEED=2 \
    --variant nosmear_s1:SMEAR_GATE_ENABLED=0,SEED=1 --variant nosmear_s2:SMEAR_GATE_ENABLED=0,SEED=2
  wait_for /tmp/smear.done $((560 - SECONDS)); tail -6 /tmp/smear.out ;;
base)  # base N [quant|eval|stepab]: the base alone at N proxy steps, a checkpoint for the levers
  n=${2:?base N}; chain=$(chain_after "base$n" "${3:-}") || exit 2
  detached base "{" python bench/proxy.py --iterations "$n" --prefix "base$n" --out /tmp/proxy --common \
    TRAIN_LOG_EVERY=50 MUON_MOMENTUM_WARMUP_FRAC=0.24 --variant base: ";" "$chain" ";" "}"
  wait_for /tmp/base.done $((560 - SECONDS)); tail -5 /tmp/base.out ;;
r300)
  detached r300 env MAX_WALLCLOCK_SECONDS=300 GPTQ_RESERVE_SECONDS=0 TTT_ENABLED=0 TRAIN_LOG_EVERY=50 \
    SAVE_PREQUANT=1 bench/gpu_run.sh 1 r300
  wait_for /tmp/r300.done 540
  grep -aE 'train_loss|stopping|val_bpb|artifact:|record_eligible' logs/r300.txt | cut -c1-250 | tail -20 ;;
sweep)  # sweep N [quant|eval|stepab]: where the depth loop starts to pay, base vs no loop at N steps
  # (the same GPU time each), then (if asked) those levers on the base's weights or the step A/B on
  # the GPU left quiet; the GPU tests run beside the sweep. Equal time as on 8xH100: 35 % of the
  # steps loop off, the rest at 141.5 / 96 of their cost (spec section 7) = 1.3081 x N steps
  n=${2:?sweep N}; chain=$(chain_after "sweep$n" "${3:-}") || exit 2
  detached sweep "{" python bench/proxy.py --iterations "$n" --prefix "sweep$n" --out /tmp/proxy --common \
    TRAIN_LOG_EVERY=50 MUON_MOMENTUM_WARMUP_FRAC=0.24 \
    --variant base: --variant noloop:NUM_LOOPS=0,ITERATIONS=$(( (n * 13081 + 5000) / 10000 )) ";" \
    "$chain" ";" "}"
  gpu_tests
  wait_for /tmp/sweep.done $((560 - SECONDS)); tail -5 /tmp/sweep.out ;;
levers)  # eval/quantization levers on one set of weights: quantization ones (fast), then eval ones (TTT timed)
  quant="--variant base:TTT_ENABLED=0 --variant nolqer:TTT_ENABLED=0,LQER_ENABLED=0
    --variant noawq:TTT_ENABLED=0,AWQ_LITE_GROUPS=0 --variant sl2048:TTT_ENABLED=0,SLIDING_ENABLED=1
    --variant sl3072:TTT_ENABLED=0,SLIDING_ENABLED=1,EVAL_SEQ_LEN=3072"
  evals="--variant ttt:TTT_ENABLED=1 --variant ttt3072:TTT_ENABLED=1,EVAL_SEQ_LEN=3072,TTT_EVAL_SEQ_LEN=3072
    --variant chunks:TTT_ENABLED=1,TTT_CHUNK_SCHEDULE=256:8,2000:24
    --variant fieldttt:TTT_ENABLED=1,TTT_LOCAL_LR_MULT=0.8,TTT_LORA_LR=8e-5,PHASED_TTT_NUM_PHASES=1
    --variant nottt:TTT_ENABLED=0"  # TTT rows not yet measured (tilt, no-Q/V, AsymLogit are in RESULTS)
  case "${3:-all}" in quant) evals= ;; eval) quant= ;; esac
  ck=${2:-/tmp/art_r300/final_model.pt}; src=--checkpoint
  case "$ck" in *.ptz) src=--artifact; quant= ;; esac  # an artifact: eval levers only
  detached levers python tools/ab.py $src "$ck" $quant $evals --json /tmp/levers.json
  sleep 5; tail -3 /tmp/levers.out ;;
wait)  # wait [S]: at most S seconds (default 570), to end a call inside the session's device time.
  # No /tmp/job: the machine is a fresh one (the last went back before this poll); say so at once
  # rather than spend S seconds of device time waiting for nothing
  job=$(cat /tmp/job 2>/dev/null) || { echo "wait: no job on this machine (a fresh start: the" \
    "previous machine and its job are gone; rerun the stage)" >&2; exit 3; }
  wait_for "/tmp/$job.done" "${2:-570}"
  tail -25 "/tmp/$job.out" ;;
*) echo "usage: $0 check|stepab|proxy N [quant|eval|stepab]|smear|base N [...]|sweep N [quant|eval|stepab]|r300|levers [CHECKPOINT [quant|eval]]|wait [S]" >&2; exit 2 ;;
esac
