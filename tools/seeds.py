#!/usr/bin/env python3
"""Multi-seed launcher and statistics for train_gpt.py logs.

    python tools/seeds.py run --seeds 42 0 1234 --nproc 8 --script run/train_gpt.py [--env KEY=VAL ...]
    python tools/seeds.py stats logs/a.txt logs/b.txt [--against ref1.txt ref2.txt] [--json]

`stats` reads the last `final_json ` line of each log. It refuses (exit 2) to pool runs whose
config_hash, world_size or source_sha256 differ unless `--allow-mixed KEY` names the key (pooled
mixed runs are then NON-RECORD). A NON-RECORD banner is printed unless there are at least 3
distinct seeds and every run is record-eligible: its own `record_eligible` verdict, re-checked
from its numbers (RECORD_LIMITS, world size 8, legality "compliant", mode "train"). Tests are
one-sided: Welch (our mean val_loss < reference mean), a one-sample test that the improvement
exceeds --bar-nats (reference mean taken as fixed), and a paired t-test over the seeds both sides
ran (same seed, same init), with Student-t tails from scipy.stats.
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

import scipy.stats

FINAL_PREFIX = "final_json "
TABLE = [("seed", "{}"), ("steps", "{}"), ("step_avg_ms", "{:.2f}"), ("val_bpb", "{:.6f}"),
         ("val_loss", "{:.6f}"), ("artifact_bytes", "{:,}"), ("train_time_s", "{:.1f}"),
         ("eval_strict_s", "{:.1f}")]
# Challenge rules that a log's numbers show (a record also needs 8 GPUs and >= 3 seeds).
RECORD_LIMITS = (("artifact_bytes", 16_000_000), ("train_time_s", 600.0), ("eval_strict_s", 600.0))
RECORD_WORLD_SIZE = 8
MIN_SEEDS = 3
POOL_KEYS = ("config_hash", "world_size", "source_sha256")  # must agree unless --allow-mixed KEY
PER_SEED_ENV = ("SEED", "RUN_ID", "ARTIFACT_DIR")  # env vars `run` sets per seed


class LogError(Exception):
    """A log cannot be used; the message names the file."""


# ---- tests (one-sided; the Student-t tail comes from scipy) ----

def _one_sided(excess, se, df):
    """t = excess / se and p = P(T > t); zero spread gives t = +-inf and p = 0 or 1."""
    if se:
        t = excess / se
        return {"t": t, "df": df, "p": float(scipy.stats.t.sf(t, df))}
    t = math.copysign(math.inf, excess) if excess else math.nan
    return {"t": t, "df": df, "p": 0.0 if t > 0 else 1.0 if t < 0 else math.nan}


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


def paired(ours, ref):
    """One-sided paired t-test over the seeds both sides ran (dicts seed -> value): mean(ref - ours)
    > 0. A seed fixes the init (the data order never depends on it), so a training lever's
    difference at equal seeds can be far less noisy than the spread between seeds. None with
    fewer than 2 common seeds."""
    common = sorted(set(ours) & set(ref))
    if len(common) < 2:
        return None
    diffs = [ref[k] - ours[k] for k in common]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {**_one_sided(statistics.fmean(diffs), se, len(diffs) - 1), "n": len(common),
            "mean_diff": statistics.fmean(diffs), "sd_diff": statistics.stdev(diffs)}


def by_seed(runs, values) -> dict:
    """{seed: value} for `paired`; empty when a run has no seed or a seed ran twice (the pairing
    would be ambiguous)."""
    keyed = {r.get("seed"): v for r, v in zip(runs, values)}
    return keyed if len(keyed) == len(values) and None not in keyed else {}


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


def pooling_problems(runs, allow_mixed=()):
    """Reasons these runs must not be pooled (empty list = fine); keys in allow_mixed may differ."""
    problems = []
    for key in POOL_KEYS:
        seen = {}
        for r in runs:
            seen.setdefault(str(r.get(key)), []).append(r["_path"])
        if len(seen) > 1 and key not in allow_mixed:
            detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in seen.items())
            problems.append(f"{key} differs between logs (pass --allow-mixed {key} to pool anyway, "
                            f"as a NON-RECORD): {detail}")
    return problems


def mixed_keys(runs):
    """POOL_KEYS on which these runs disagree."""
    return [k for k in POOL_KEYS if len({str(r.get(k)) for r in runs}) > 1]


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def run_problems(r):
    """Why one run cannot back a record: its own verdict, then what its numbers show.

    The numbers are re-checked so that an edited log cannot pass by flipping record_eligible."""
    if "record_eligible" not in r:
        out = ["log predates record_eligible"]
    elif r["record_eligible"] is not True:
        out = [str(x) for x in r.get("not_record_because") or []] or ["record_eligible is false"]
    elif r.get("not_record_because"):
        out = ["record_eligible is true but not_record_because lists "
               + "; ".join(map(str, r["not_record_because"]))]
    else:
        out = []
    for key, cap in RECORD_LIMITS:
        v = r.get(key)
        if not _is_number(v):
            out.append(f"{key} missing")
        elif v > cap:
            out.append(f"{key}={_num(v)} over the {_num(cap)} limit")
    if r.get("world_size") != RECORD_WORLD_SIZE:
        out.append(f"world_size={r.get('world_size', '-')}, a record runs on {RECORD_WORLD_SIZE} GPUs")
    if r.get("legality") != "compliant":
        out.append(f"legality={r.get('legality', '-')}")
    if r.get("mode") != "train":
        out.append(f"mode={r.get('mode', '-')}")
    return list(dict.fromkeys(out))


def non_record_reasons(runs):
    """Why these runs together cannot back a record claim (empty list = they can)."""
    reasons = [f"{r['_path']}: {why}" for r in runs for why in run_problems(r)]
    seeds = {r.get("seed") for r in runs} - {None}
    if len(seeds) < MIN_SEEDS:
        reasons.append(f"{len(seeds)} distinct seed(s); a record needs at least {MIN_SEEDS}")
    reasons += [f"pooled runs of different {k} (--allow-mixed)" for k in mixed_keys(runs)]
    return reasons


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
        out["paired"] = paired(by_seed(runs, ours), by_seed(refs, ref))
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
    unit = "val_loss" if s["metric"] == "val_loss" else "val_bpb x nats/bpb"  # compared in nats
    print(f"reference: n={s['ref_n']}  mean {unit} {fmt(s['ref_mean'], '{:.6f}')}  "
          f"improvement {fmt(s['improvement_nats'], '{:.6f}')} nats")
    pair = s["paired"]
    tests = (("Welch, ours < ref", s["welch"], "needs >= 2 runs on each side"),
             (f"one-sample, improvement > {s['bar_nats']} nats", s["bar"], "needs >= 2 runs on each side"),
             ("paired by seed, ours < ref" + (f" ({pair['n']} seeds, improvement {pair['mean_diff']:.6f}"
                                              f" nats, sd {pair['sd_diff']:.6f})" if pair else ""),
              pair, "needs >= 2 seeds that each side ran once"))
    for label, test, missing in tests:
        if test is None:
            print(f"{label}: {missing}")
            continue
        verdict = "yes" if test["p"] < 0.01 else "no"
        print(f"{label}: t={test['t']:.3f} df={test['df']:.2f} p={test['p']:.4g}  p<0.01: {verdict}")


def stats(logs, against=(), bar=0.005, allow_mixed=(), as_json=False, metric="val_loss"):
    """Implements the `stats` subcommand; returns the exit code."""
    try:
        runs = [read_final(p) for p in logs]
        refs = [read_reference(p) for p in against]
    except LogError as e:
        print(f"seeds stats: {e}", file=sys.stderr)
        return 2
    problems = pooling_problems(runs, allow_mixed)
    if refs and any("config_hash" in r for r in refs):  # references may come from another source
        problems += [f"reference {p}" for p in pooling_problems(refs, (*allow_mixed, "source_sha256"))]
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
        if key in PER_SEED_ENV:
            raise SystemExit(f"seeds run: --env {key}=... is set per seed; remove it "
                             "(ARTIFACT_DIR is <--artifact-root>/<RUN_ID>)")
        extra[key] = val
    argv = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", args.script]
    cmds = []
    for s in args.seeds:
        run_id = f"{args.prefix}_seed{s}"
        env = {**extra, "SEED": str(s), "RUN_ID": run_id,
               "ARTIFACT_DIR": os.path.join(args.artifact_root, run_id)}
        cmds.append((run_id, env, argv))
    return cmds


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
    p_run.add_argument("--artifact-root", default="artifacts",
                       help="each seed writes final_model.ptz into ARTIFACT_DIR=<this>/<RUN_ID>")
    p_run.add_argument("--dry-run", action="store_true", help="print the commands only")
    p_stats = sub.add_parser("stats", help="per-seed table, mean/std and significance tests")
    p_stats.add_argument("logs", nargs="+")
    for p in (p_run, p_stats):
        p.add_argument("--against", nargs="+", default=[], metavar="REF_LOG", help="reference logs")
        p.add_argument("--bar-nats", type=float, default=0.005, help="required improvement (nats)")
        p.add_argument("--allow-mixed", nargs="+", default=[], choices=POOL_KEYS, metavar="KEY",
                       help=f"pool logs that differ in these keys ({', '.join(POOL_KEYS)}); NON-RECORD")
        p.add_argument("--metric", choices=["val_loss", "bpb"], default="val_loss",
                       help="compare val_loss, or val_bpb converted with our bytes/token")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    return stats(args.logs, args.against, args.bar_nats, args.allow_mixed, args.json, args.metric)


if __name__ == "__main__":
    sys.exit(main())
