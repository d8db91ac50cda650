"""One-GPU proxy runs: several short, step-scheduled trainings of train_gpt.py side by side on one GPU.

  python bench/proxy.py --iterations 200 --batch 262144 \
      --variant base: --variant seed1:SEED=1 --variant nogate:ATTN_GATE=none \
      --variant noloop:NUM_LOOPS=0,ITERATIONS=243 [--common KEY=VAL ...] [--out DIR]
  python bench/proxy.py --iterations 200 --seeds 42 1 2 --variant base: --variant nogate:ATTN_GATE=none

With --seeds every variant runs once per seed (NAME_sSEED) and a second table gives each
variant's mean quantized val_bpb, its delta against the first variant's mean and the one-sided
p that it is lower, by Welch and paired by seed (tools/seeds.py's tests).

Every variant is its own process of train_gpt.py (one GPU, no torchrun). The first starts alone;
the others start once it logs its first training step, so they read its compiled graphs from the
inductor cache instead of compiling them side by side (measured: six cold compiles at once on
16 cores reached no training step in 8 minutes, bench/RESULTS.md).
Runs are scheduled by steps (MAX_WALLCLOCK_SECONDS=0: progress = step / ITERATIONS), so sharing
the GPU changes how long they take but not what they compute: the loop switch, the warmdown and
every result are the same as a run alone. A lever that changes the step cost (the depth loop)
is compared at equal compute by giving it more or fewer ITERATIONS (see bench/RESULTS.md).
TTT is off unless a variant turns it on; SAVE_PREQUANT keeps each EMA checkpoint for tools/ab.py.
Prints one row per variant (steps, raw / EMA / quantized val_bpb) and its delta against the first.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from seeds import paired, welch  # noqa: E402


def parse_env(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"proxy: {item!r} must look like KEY=VALUE")
        out[key] = val
    return out


def log_path(run_id: str) -> str:
    return os.path.join(ROOT, "logs", f"{run_id}.txt")


def final_json(path: str) -> dict:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln for ln in f if ln.startswith("final_json ")]
    return json.loads(lines[-1][len("final_json "):]) if lines else {}


def wait_first_step(log: str, proc: subprocess.Popen, poll: float = 2.0):
    """Until the log has a training-step line (compile done) or the process has ended."""
    step = re.compile(r"^\d+/\d+ train_loss: ", re.M)  # the log's source dump has it indented only
    while proc.poll() is None:
        if os.path.exists(log) and step.search(open(log, encoding="utf-8", errors="replace").read()):
            return
        time.sleep(poll)


def seed_table(rows: list, variants: list, seeds: list, key: str = "val_bpb_diagnostic") -> str:
    """Per variant over its seeds: n, mean, delta vs the first variant's mean, and the one-sided p
    that it is lower: Welch, and paired by seed (same seed, same init: often far less noisy)."""
    by = {n: r.get(key) for n, _, r in rows}
    vals = {v: {s: by[f"{v}_s{s}"] for s in seeds if by.get(f"{v}_s{s}") is not None} for v in variants}
    base = vals[variants[0]]
    lines = [f"{'variant':>12} {'n':>2} {'mean':>9} {'sd':>8} {'delta':>9} {'p(Welch)':>9} {'p(paired)':>9}"]
    for v in variants:
        xs = list(vals[v].values())
        if not xs:
            lines.append(f"{v:>12}  0 (no finished run)")
            continue
        mean, sd = statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")
        first = v == variants[0] or not base
        tests = [None, None] if first else [welch(xs, list(base.values())), paired(vals[v], base)]
        delta = f"{mean - statistics.fmean(base.values()):+.5f}" if base else "-"
        lines.append(f"{v:>12} {len(xs):>2} {mean:>9.5f} {sd:>8.5f} {delta:>9} " + " ".join(
            f"{t['p'] if t else float('nan'):>9.3f}" for t in tests))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--batch", type=int, default=262144, help="TRAIN_BATCH_TOKENS")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:K=V,K=V")
    ap.add_argument("--common", nargs="*", default=[], metavar="K=V", help="env for every variant")
    ap.add_argument("--seeds", nargs="*", type=int, default=[], help="run every variant once per seed")
    ap.add_argument("--prefix", default="proxy")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/proxy"))
    args = ap.parse_args(argv)
    common = dict(MAX_WALLCLOCK_SECONDS="0", ITERATIONS=str(args.iterations), TTT_ENABLED="0",
                  TRAIN_BATCH_TOKENS=str(args.batch), SAVE_PREQUANT="1", TRAIN_LOG_EVERY="50")
    common.update(parse_env(",".join(args.common)))
    os.makedirs(args.out, exist_ok=True)
    procs, t0 = [], time.time()
    names = [spec.partition(":")[0] for spec in args.variant]
    runs = [(name, parse_env(spec.partition(":")[2])) for name, spec in zip(names, args.variant)]
    if args.seeds:
        runs = [(f"{name}_s{seed}", {**env, "SEED": str(seed)}) for name, env in runs for seed in args.seeds]
    for name, env in runs:
        run_id = f"{args.prefix}_{name}"
        env = {**common, **env, "RUN_ID": run_id, "ARTIFACT_DIR": f"/tmp/art_{run_id}"}
        print(f"[proxy] {name}: " + " ".join(f"{k}={v}" for k, v in env.items()), flush=True)
        out = open(os.path.join(args.out, f"{run_id}.out"), "w")
        if os.path.exists(log_path(run_id)):
            os.remove(log_path(run_id))  # a stale log would look like a compiled first variant
        if len(procs) == 1:
            wait_first_step(log_path(procs[0][1]), procs[0][2])
            print(f"[proxy] {procs[0][0]} compiled in {time.time() - t0:.0f}s; starting the others", flush=True)
        procs.append((name, run_id, subprocess.Popen([sys.executable, "train_gpt.py"], cwd=ROOT,
                                                      env={**os.environ, **env}, stdout=out,
                                                      stderr=subprocess.STDOUT)))
    rows = []
    for name, run_id, p in procs:
        rc = p.wait()
        log = os.path.join(ROOT, "logs", f"{run_id}.txt")
        rec = final_json(log) if os.path.exists(log) else {}
        rows.append((name, rc, rec))
    print(f"[proxy] all done in {time.time() - t0:.0f}s")
    base = rows[0][2]
    print(f"{'variant':>12} {'rc':>3} {'steps':>6} {'raw':>9} {'ema':>9} {'quant':>9} {'d_quant':>9}")
    for name, rc, r in rows:
        q = r.get("val_bpb_diagnostic")
        dq = q - base["val_bpb_diagnostic"] if q is not None and base.get("val_bpb_diagnostic") else None
        cells = [r.get("steps"), r.get("val_bpb_raw"), r.get("val_bpb_prequant"), q, dq]
        fmt = ["{}", "{:.5f}", "{:.5f}", "{:.5f}", "{:+.5f}"]
        print(f"{name:>12} {rc:>3} " + " ".join(
            (f.format(c) if c is not None else "-").rjust(w) for f, c, w in zip(fmt, cells, (6, 9, 9, 9, 9))))
    if args.seeds:
        print(seed_table(rows, names, args.seeds))
    with open(os.path.join(args.out, f"{args.prefix}_summary.json"), "w") as f:
        json.dump([{"variant": n, "rc": rc, **r} for n, rc, r in rows], f, indent=1)
    return max(rc for _, rc, _ in rows)


if __name__ == "__main__":
    sys.exit(main())
