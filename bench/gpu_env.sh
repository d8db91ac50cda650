# Device-side setup, sourced by bench/gpu_run.sh and by one-off benchmark commands:
#   . bench/gpu_env.sh && BENCH_DATA=/tmp/bench_caseops python bench/bench_step.py
# Installs the carried wheels (.whl/: brotli) into /tmp/site, puts a `python` on PATH, and
# tokenizes the bench pack (.bench/) once into /tmp/bench_caseops (time printed).
py=$(command -v python3)  # a wrapper, not a symlink: a symlinked venv python loses its venv
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$py" > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
if [ -d .whl ] && ! python3 -c "import brotli" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
[ -f /tmp/bench_caseops/manifest.json ] || WORKERS=$(nproc) bench/tokenize_bench.sh /tmp/bench_caseops
export DATA_PATH=${DATA_PATH:-/tmp/bench_caseops}
export TOKENIZER_PATH=${TOKENIZER_PATH:-/tmp/bench_caseops/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model}
