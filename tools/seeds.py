#!/usr/bin/env python3
"""Multi-seed launcher and statistics for train_gpt.py logs.

    python tools/seeds.py run --seeds 42 0 1234 --nproc 8 [--env KEY=VAL ...] [--dry-run]
    python tools/seeds.py stats logs/a.txt logs/b.txt [--against ref1.txt ref2.txt] [--json]

`stats` reads the last `final_json ` line of each log. It refuses (exit 2) to pool runs whose
config_hash differs, or whose source_sha256 differs unless --allow-mixed. Tests are one-sided:
Welch (our mean val_loss < reference mean) and a one-sample test that the improvement exceeds
--bar-nats (reference mean taken as fixed). Stdlib only; the Student-t CDF is implemented here.
"""
import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

FINAL_PREFIX = "final_json "
TABLE = [("seed", "{}"), ("steps", "{}"), ("step_avg_ms", "{:.2f}"), ("val_bpb", "{:.6f}"),
         ("val_loss", "{:.6f}"), ("artifact_bytes", "{:,}"), ("eval_strict_s", "{:.1f}")]


class LogError(Exception):
    """A log cannot be used; the message names the file."""


# ---- Student-t distribution (regularized incomplete beta via Lentz's continued fraction) ----

def _beta_cf(a, b, x):
    tiny = 1e-300  # keeps Lentz's divisions away from zero
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = h = 1.0 / (d if abs(d) > tiny else tiny)
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only for x < (a+1)/(a+b+2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_sf(t, df):
    """One-sided p-value P(T > t) for Student's t with df degrees of freedom (df may be fractional)."""
    if math.isnan(t) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    # P(|T| > t) = I_x(df/2, 1/2) with x = df/(df+t^2) = 1 - y; pass the smaller of x, y so
    # that small |t| (x rounding to 1.0) keeps full precision.
    x, y = df / (df + t * t), t * t / (df + t * t)
    tail = 0.5 * (betainc(df / 2.0, 0.5, x) if x < y else 1.0 - betainc(0.5, df / 2.0, y))
    return tail if t > 0 else 1.0 - tail


def _one_sided(excess, se, df):
    """t = excess / se and p = P(T > t); zero spread gives t = +-inf (nan if excess is 0 too)."""
    t = excess / se if se else (math.copysign(math.inf, excess) if excess else math.nan)
    return {"t": t, "df": df, "p": t_sf(t, df)}


def welch(ours, ref):
    """One-sided Welch test of mean(ours) < mean(ref); None if either side has < 2 runs."""
    if len(ours) < 2 or len(ref) < 2:
        return None
    a, b = statistics.variance(ours) / len(ours), statistics.variance(ref) / len(ref)
    df = (a + b) ** 2 / (a * a / (len(ours) - 1) + b * b / (len(ref) - 1)) if a + b else math.nan
    return _one_sided(statistics.fmean(ref) - statistics.fmean(ours), math.sqrt(a + b), df)


def bar_test(ours, ref_mean, bar):
    """One-sample test that ref_mean - mean(ours) > bar, with ref_mean treated as fixed."""
    if len(ours) < 2:
        return None
    se = statistics.stdev(ours) / math.sqrt(len(ours))
    return _one_sided(ref_mean - statistics.fmean(ours) - bar, se, len(ours) - 1)


# ---- logs ----

def read_final(path):
    """Return the last final_json object of a log, with '_path' added."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(FINAL_PREFIX)]
    except OSError as e:
        raise LogError(f"{path}: cannot read log ({e.strerror})") from None
    if not lines:
        raise LogError(f"{path}: no line starting with '{FINAL_PREFIX}' (run did not finish?)")
    try:
        rec = json.loads(lines[-1][len(FINAL_PREFIX):])
    except json.JSONDecodeError as e:
        raise LogError(f"{path}: last final_json line is not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise LogError(f"{path}: final_json is not a JSON object")
    return {**rec, "_path": path}


def read_reference(path):
    """Like read_final, but accepts older logs that only print 'val_loss:X val_bpb:Y' lines."""
    try:
        return read_final(path)
    except LogError:
        with open(path, encoding="utf-8", errors="replace") as f:
            hits = re.findall(r"val_loss:([0-9.]+)\s+val_bpb:([0-9.]+)", f.read())
        if not hits:
            raise LogError(f"{path}: no final_json and no 'val_loss:X val_bpb:Y' line") from None
        return {"val_loss": float(hits[-1][0]), "val_bpb": float(hits[-1][1]), "_path": path}


def pooling_problems(runs, allow_mixed):
    """Reasons these runs must not be pooled (empty list = fine)."""
    problems = []
    for key, allowed in (("config_hash", False), ("source_sha256", allow_mixed)):
        seen = {}
        for r in runs:
            seen.setdefault(r.get(key), []).append(r["_path"])
        if len(seen) > 1 and not allowed:
            detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in seen.items())
            hint = "" if key == "config_hash" else " (pass --allow-mixed to pool anyway)"
            problems.append(f"{key} differs between logs{hint}: {detail}")
    return problems


def non_record_reasons(runs):
    """Why these runs cannot back a record claim (empty list = they can)."""
    return [f"{r['_path']}: {key}={r.get(key, '-')}" for r in runs
            for key, want in (("mode", "record"), ("legality", "compliant")) if r.get(key) != want]


def column(runs, key):
    return [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]


def mean_std(xs):
    return statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None


def bytes_per_token(runs):
    """Measured bytes/token from the logs (bytes_scored / tokens_scored), or None."""
    pairs = [(r["bytes_scored"], r["tokens_scored"]) for r in runs
             if r.get("bytes_scored") and r.get("tokens_scored")]
    return sum(b for b, _ in pairs) / sum(t for _, t in pairs) if pairs else None


def summarize(runs, refs=None, bar=0.005, metric="val_loss"):
    """All numbers `stats` prints, as a JSON-ready dict."""
    bpt = bytes_per_token(runs)
    nats_per_bpb = math.log(2) * bpt if bpt else None
    out = {"n": len(runs), "config_hash": runs[0].get("config_hash"), "bytes_per_token": bpt,
           "nats_per_bpb": nats_per_bpb, "non_record": non_record_reasons(runs), "metric": metric,
           "runs": [{k: r.get(k) for k, _ in TABLE} | {"log": r["_path"]} for r in runs]}
    for key in ("val_bpb", "val_loss"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std(column(runs, key))
    if refs:
        def values(rs):
            if metric == "val_loss":
                return column(rs, "val_loss")
            return [v * nats_per_bpb for v in column(rs, "val_bpb")] if nats_per_bpb else []
        ours, ref = values(runs), values(refs)
        out["ref_n"], out["ref_mean"] = len(ref), statistics.fmean(ref) if ref else None
        out["ref_bytes_per_token"] = bytes_per_token(refs)
        out["improvement_nats"] = out["ref_mean"] - statistics.fmean(ours) if ref and ours else None
        out["welch"] = welch(ours, ref)
        out["bar_nats"] = bar
        out["bar"] = bar_test(ours, out["ref_mean"], bar) if ref else None
    return out


def fmt(value, spec="{}"):
    """Format a number with `spec`; anything missing or non-numeric shows as-is or '-'."""
    if value is None:
        return "-"
    return spec.format(value) if isinstance(value, (int, float)) else str(value)


def table_rows(runs):
    """Header plus one row of strings per run (also used by tools/package.py)."""
    return [[k for k, _ in TABLE]] + [[fmt(r.get(k), spec) for k, spec in TABLE] for r in runs]


def print_report(s):
    if s["non_record"]:
        print("=" * 60 + "\nNON-RECORD: these runs cannot support a record claim\n"
              + "\n".join("  " + x for x in s["non_record"]) + "\n" + "=" * 60)
    print(f"runs: {s['n']}  config_hash: {fmt(s['config_hash'])}")
    rows = table_rows(s["runs"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for key in ("val_bpb", "val_loss"):
        print(f"{key}: mean {fmt(s[key + '_mean'], '{:.6f}')}  std {fmt(s[key + '_std'], '{:.6f}')}")
    print(f"bytes/token (bytes_scored/tokens_scored): {fmt(s['bytes_per_token'], '{:.5f}')}  "
          f"nats/token = bpb * {fmt(s['nats_per_bpb'], '{:.5f}')} (ln2 * bytes/token)")
    if "welch" not in s:
        return
    print(f"reference: n={s['ref_n']}  mean {s['metric']} {fmt(s['ref_mean'], '{:.6f}')}  "
          f"improvement {fmt(s['improvement_nats'], '{:.6f}')} nats")
    for label, test in (("Welch, ours < ref", s["welch"]),
                        (f"one-sample, improvement > {s['bar_nats']} nats", s["bar"])):
        if test is None:
            print(f"{label}: needs >= 2 runs on each side")
            continue
        verdict = "yes" if test["p"] < 0.01 else "no"
        print(f"{label}: t={test['t']:.3f} df={test['df']:.2f} p={test['p']:.4g}  p<0.01: {verdict}")


def stats(logs, against=(), bar=0.005, allow_mixed=False, as_json=False, metric="val_loss"):
    """Implements the `stats` subcommand; returns the exit code."""
    try:
        runs = [read_final(p) for p in logs]
        refs = [read_reference(p) for p in against]
    except LogError as e:
        print(f"seeds stats: {e}", file=sys.stderr)
        return 2
    problems = pooling_problems(runs, allow_mixed)
    if refs and any("config_hash" in r for r in refs):
        problems += [f"reference {p}" for p in pooling_problems(refs, allow_mixed=True)]
    if problems:
        print("seeds stats: refusing to aggregate:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    s = summarize(runs, refs, bar, metric)
    if refs and metric == "bpb" and not s["nats_per_bpb"]:
        print("seeds stats: --metric bpb needs tokens_scored and bytes_scored in our logs",
              file=sys.stderr)
        return 2
    ours_bpt, ref_bpt = s["bytes_per_token"], s.get("ref_bytes_per_token")
    if metric == "val_loss" and ours_bpt and ref_bpt and abs(ours_bpt / ref_bpt - 1) > 1e-6:
        print(f"warning: bytes/token differs (ours {ours_bpt:.5f}, reference {ref_bpt:.5f}): "
              "val_loss is per token of different tokenizers; consider --metric bpb", file=sys.stderr)
    if as_json:
        print(json.dumps(s, indent=2, sort_keys=True))
    else:
        print_report(s)
    return 0


def launch_commands(args):
    """[(run_id, env_overrides, argv)] for each seed."""
    extra = {}
    for item in args.env:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"seeds run: --env {item!r} must look like KEY=VALUE")
        if key in ("SEED", "RUN_ID"):
            raise SystemExit(f"seeds run: --env {key}=... is set per seed; remove it")
        extra[key] = val
    argv = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", args.script]
    return [(f"{args.prefix}_seed{s}", {**extra, "SEED": str(s), "RUN_ID": f"{args.prefix}_seed{s}"}, argv)
            for s in args.seeds]


def run(args):
    """Implements the `run` subcommand: sequential launches, stop at first failure, then stats."""
    cmds = launch_commands(args)
    logs = [os.path.join(args.log_dir, f"{run_id}.txt") for run_id, _, _ in cmds]
    for (run_id, env, argv), log in zip(cmds, logs):
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)
        if args.dry_run:
            print(line)
            continue
        if os.path.exists(log):
            print(f"seeds run: {log} already exists; pick another --prefix", file=sys.stderr)
            return 2
        print(f"[seeds] {line}", flush=True)
        rc = subprocess.run(argv, env={**os.environ, **env}).returncode
        if rc != 0:
            print(f"seeds run: {run_id} failed with exit code {rc}; stopping (see {log})",
                  file=sys.stderr)
            return rc
    if args.dry_run:
        return 0
    return stats(logs, args.against, args.bar_nats, args.allow_mixed, args.json, args.metric)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="launch one run per seed, then print stats")
    p_run.add_argument("--seeds", type=int, nargs="+", required=True)
    p_run.add_argument("--nproc", type=int, default=8, help="GPUs per run (torchrun --nproc_per_node)")
    p_run.add_argument("--env", nargs="*", default=[], metavar="KEY=VAL", help="extra env vars")
    p_run.add_argument("--script", default="train_gpt.py", help="file to launch (the packed one for records)")
    p_run.add_argument("--prefix", default=time.strftime("%Y%m%d_%H%M%S"), help="RUN_ID prefix")
    p_run.add_argument("--log-dir", default="logs", help="where the script writes <RUN_ID>.txt")
    p_run.add_argument("--dry-run", action="store_true", help="print the commands only")
    p_stats = sub.add_parser("stats", help="per-seed table, mean/std and significance tests")
    p_stats.add_argument("logs", nargs="+")
    for p in (p_run, p_stats):
        p.add_argument("--against", nargs="+", default=[], metavar="REF_LOG", help="reference logs")
        p.add_argument("--bar-nats", type=float, default=0.005, help="required improvement (nats)")
        p.add_argument("--allow-mixed", action="store_true", help="pool logs of different source_sha256")
        p.add_argument("--metric", choices=["val_loss", "bpb"], default="val_loss",
                       help="compare val_loss, or val_bpb converted with our bytes/token")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    return stats(args.logs, args.against, args.bar_nats, args.allow_mixed, args.json, args.metric)


if __name__ == "__main__":
    sys.exit(main())
