#!/usr/bin/env python3
"""Build and verify a record folder records/track_10min_16mb/<date>_<name>/.

    python tools/package.py --name my_run --logs logs/r_seed42.txt logs/r_seed0.txt ... \\
        --source train_gpt.py --packed run/train_gpt.py --blurb "what is new" [--dry-run-cmd]

Every number in the folder is regenerated from the logs' final_json lines and re-checked
against the shipped files: the counted train_gpt.py (the packed loader), its readable source
train_gpt_source.py, the per-seed logs, submission.json (the upstream records' schema) and
README.md, plus what a fresh copy of the folder needs to rebuild its data and rerun: the data
pipeline (data/*.py, lossless_caps.py), requirements.txt and the tokenizer. Hard problems (sizes,
hashes, mixed configs, world sizes or env overrides, disallowed imports) refuse with exit 2 and
write nothing; a folder that cannot back a record (see seeds.non_record_reasons) is built but
stamped NON-RECORD in its README and in submission.json.
"""
import argparse
import ast
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys

import pack
import seeds

CAP_BYTES = dict(seeds.RECORD_LIMITS)["artifact_bytes"]
ALLOWED_IMPORTS = {"torch", "numpy", "sentencepiece", "brotli", "flash_attn_interface", "triton"}
# What `python data/download.py` / `data/prepare.py` need in a fresh copy of the folder.
REPRO_FILES = ["requirements.txt", "lossless_caps.py", "data/__init__.py", "data/common.py",
               "data/prepare.py", "data/download.py", "data/verify.py", "data/README.md"]
HELP_CHECKS = ["train_gpt.py", "data/prepare.py", "data/download.py"]  # each `--help` must exit 0
# manifest variant -> data/download.py --variant (the published exports)
DOWNLOAD_VARIANTS = {"caseops": "caseops", "sp": "sp8192"}
MIXABLE = ("config_hash", "world_size", "env_overrides")  # --allow-mixed choices
COMPLIANCE_NAMES = {"artifact_bytes": "artifact_under_16mb", "train_time_s": "train_under_600s",
                    "eval_strict_s": "eval_under_600s"}
# Calls that load code from another file; counted code must not hide behind them.
FILE_LOADERS = {"run_path", "spec_from_file_location", "SourceFileLoader", "load_source", "exec_module"}
README = string.Template("""\
# $name
$banner
$blurb

Mean val_bpb **$bpb_mean** (std $bpb_std) and val_loss $loss_mean nats (std $loss_std) over
$n seeds. Largest artifact: $artifact_max bytes (code $code_bytes + model), cap 16,000,000.

$table

* record: $record; mode: $mode; legality: $legality
* compliance (re-checked from the logs' numbers): $compliance
* config_hash: `$config_hash`
* source_sha256: `$source_sha256` (of `train_gpt_source.py`)
* hardware: $hardware; torch $torch
* data: $data

## Reproduce

From a fresh copy of this folder (it holds everything the commands use):

    pip install -r requirements.txt
$data_step
$commands

Each seed writes `logs/<RUN_ID>.txt`; the env vars are every override the runs logged
(`env_overrides` in their final_json).

## Files

* `train_gpt.py`: the counted file, a self-extracting loader of `train_gpt_source.py`
  (built by `tools/pack.py`; `python tools/pack.py train_gpt_source.py -o train_gpt.py --name
  train_gpt.py --check` re-verifies it).
* `train_gpt_source.py`: the readable source that ran (not counted; same sha256 as logged).
* `train_seed<seed>.log`: one training log per seed; `submission.json` is generated from them.
* `data/`, `lossless_caps.py`, `requirements.txt`$tokenizer_file: the data pipeline that built or
  downloaded the shards (`data/README.md`).
""")


def check_imports(path, extra_allowed=()):
    """Violations ('path:line: why') of the rule: stdlib + allow-list imports only, no file exec."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    allowed = set(sys.stdlib_module_names) | ALLOWED_IMPORTS | set(extra_allowed)
    problems = []
    for node in ast.walk(tree):
        for why in _node_violations(node, allowed):
            problems.append(f"{path}:{node.lineno}: {why}")
    return problems


def _call_name(node):
    func = node.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _node_violations(node, allowed):
    """Yield reasons why one AST node breaks the import rule."""
    if isinstance(node, ast.ImportFrom) and node.level:
        yield f"relative import 'from {'.' * node.level}{node.module or ''}' pulls in a local module"
        return
    modules = []
    if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        modules = [node.module]
    elif isinstance(node, ast.Call):
        name = _call_name(node)
        if name in ("__import__", "import_module"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                modules = [arg.value]
            else:
                yield f"{name}() with a computed module name cannot be checked"
        elif name in FILE_LOADERS:
            yield f"{name}() loads code from another file"
        elif name in ("exec", "eval", "compile") and any(
                isinstance(n, ast.Call) and _call_name(n) in ("open", "read", "read_text", "read_bytes")
                for a in node.args for n in ast.walk(a)):
            yield f"{name}() of text read from a file (exec(open(...)) style)"
        elif name == "open" and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).endswith(".py"):
            yield f"opens local source file {node.args[0].value!r}"
    for mod in modules:
        if mod.split(".")[0] not in allowed:
            yield f"imports '{mod}', which is neither stdlib nor in the allow-list"


def seed_overrides(r):
    """The run's logged env overrides without the per-seed ones (SEED, RUN_ID, ARTIFACT_DIR)."""
    return {k: v for k, v in (r.get("env_overrides") or {}).items() if k not in seeds.PER_SEED_ENV}


def verify(runs, packed, source, source_path, packed_name, allow_mixed=()):
    """Hard problems that make the folder unusable (empty list = fine)."""
    # source_sha256 is checked per log against the shipped source below
    problems = seeds.pooling_problems(runs, [k for k in allow_mixed if k in seeds.POOL_KEYS] + ["source_sha256"])
    sha = hashlib.sha256(source).hexdigest()
    try:
        if pack.unpack_bytes(packed, packed_name)[2] != source:
            problems.append(f"{packed_name}: embedded source differs from {source_path}; re-pack")
    except pack.PackError as e:
        problems.append(str(e))
    for r in runs:
        log = r["_path"]
        if r.get("code_bytes") != len(packed):
            problems.append(f"{log}: code_bytes={r.get('code_bytes')} but {packed_name} is "
                            f"{len(packed)} bytes (was the run launched from this packed file?)")
        if r.get("source_sha256") != sha:
            problems.append(f"{log}: source_sha256 differs from sha256 of {source_path}")
        art = r.get("artifact_bytes")
        if not isinstance(art, int) or art > CAP_BYTES:
            problems.append(f"{log}: artifact_bytes={art} is missing or over the {CAP_BYTES:,} cap")
        elif isinstance(r.get("model_bytes"), int) and art != r.get("code_bytes", 0) + r["model_bytes"]:
            problems.append(f"{log}: artifact_bytes != code_bytes + model_bytes")
    seed_list = [r.get("seed") for r in runs]
    if any(not isinstance(s, int) for s in seed_list) or len(set(seed_list)) != len(seed_list):
        problems.append(f"seeds must be present, integers and distinct across --logs, got {seed_list}")
    views = {json.dumps(seed_overrides(r), sort_keys=True) for r in runs if "env_overrides" in r}
    if len(views) > 1 and "env_overrides" not in allow_mixed:
        detail = "; ".join(f"{r['_path']}: {seed_overrides(r)}" for r in runs)
        problems.append("seeds ran with different env overrides besides SEED/RUN_ID/ARTIFACT_DIR "
                        f"(pass --allow-mixed env_overrides to package them as NON-RECORD): {detail}")
    return problems


def folder_reasons(runs):
    """NON-RECORD reasons of the folder: the runs' own (seeds.non_record_reasons) plus what keeps
    the folder from stating the command and data that ran."""
    reasons = seeds.non_record_reasons(runs)
    reasons += [f"{r['_path']}: log lacks env_overrides (the command that ran is unknown)"
                for r in runs if not isinstance(r.get("env_overrides"), dict)]
    if len({json.dumps(seed_overrides(r), sort_keys=True) for r in runs}) > 1:
        reasons.append("seeds ran with different env overrides (--allow-mixed env_overrides)")
    if len({json.dumps(r.get("data"), sort_keys=True) for r in runs}) > 1:
        reasons.append("seeds ran on different data (final_json 'data' differs)")
    return reasons


def source_default(source, field):
    """The default of a Hyperparameters field, read from its `name: str = "value"  # ...` line."""
    m = re.search(rf'^\s+{field}: str = "([^"]*)"', source.decode("utf-8"), re.M)
    return m.group(1) if m else None


def run_paths(runs, source):
    """(DATA_PATH, TOKENIZER_PATH) as the runs resolved them: override, else the source default."""
    env = (runs[0].get("env_overrides") or {})
    return (env.get("DATA_PATH", source_default(source, "data_path")),
            env.get("TOKENIZER_PATH", source_default(source, "tokenizer_path")))


def data_step(runs, data_path, tok_path):
    """(the README's data command, or None when no published export matches, and its note)."""
    data = runs[0].get("data") or {}
    variant = DOWNLOAD_VARIANTS.get(data.get("variant"))
    if not data:
        return None, "not recorded in the logs"
    note = (f"variant {data.get('variant')}, {data.get('train_shards')} train shards, "
            f"{data.get('val_targets')} val targets, manifest sha256 `{data.get('manifest_sha256')}`")
    if variant is None:
        return None, note
    cmd = ["python", "data/download.py", "--variant", variant, "--train-shards", str(data.get("train_shards", 80))]
    cmd += ["--out", data_path] if data_path else []
    cmd += ["--tokenizer-dir", os.path.dirname(tok_path) or "."] if tok_path else []
    return shlex.join(cmd), note


def seed_env(r, name, seed="$SEED"):
    """Shell words setting every logged override, with the per-seed ones for `seed`."""
    env = seed_overrides(r)
    words = [f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items())]
    words += [f"SEED={seed}", f"RUN_ID={name}_seed{seed}"]
    if "ARTIFACT_DIR" in (r.get("env_overrides") or {}):
        words.append(f"ARTIFACT_DIR=artifacts/{name}_seed{seed}")
    return " ".join(words)


def reproduce_commands(runs, name):
    """The exact launch: one loop when the seeds share their overrides, else one line per seed."""
    torchrun = f"torchrun --standalone --nproc_per_node={runs[0].get('world_size', 8)} train_gpt.py"
    if len({json.dumps(seed_overrides(r), sort_keys=True) for r in runs}) == 1:
        seed_list = " ".join(str(r["seed"]) for r in runs)
        return (f"    for SEED in {seed_list}; do\n        {seed_env(runs[0], name)} \\\n"
                f"            {torchrun}\n    done")
    return "\n".join(f"    {seed_env(r, name, r['seed'])} {torchrun}" for r in runs)


def read_device(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("device:")), None)


def one_or_all(values):
    """A single value if all runs agree, else the per-run list (so disagreement stays visible)."""
    return values[0] if len(set(map(str, values))) == 1 else values


def hardware(runs):
    names = {f"{r['world_size']}x {r['gpu']}" if r.get("gpu") and r.get("world_size") else read_device(r["_path"])
             for r in runs}
    return "; ".join(sorted(n for n in names if n)) or None


def compliance(runs):
    """The upstream records' compliance block, each flag re-checked from every log's numbers."""
    out = {}
    for key, cap in seeds.RECORD_LIMITS:
        out[COMPLIANCE_NAMES[key]] = all(seeds._is_number(r.get(key)) and r[key] <= cap for r in runs)
    out["eight_gpus"] = all(r.get("world_size") == seeds.RECORD_WORLD_SIZE for r in runs)
    out["legality_compliant"] = all(r.get("legality") == "compliant" for r in runs)  # C1-C4 ledger
    out["record_eligible"] = all(r.get("record_eligible") is True for r in runs)
    out["three_seeds"] = len({r.get("seed") for r in runs}) >= seeds.MIN_SEEDS
    return out


def seed_result(r):
    keys = ("val_bpb", "val_loss", "artifact_bytes", "train_time_s", "eval_strict_s", "steps",
            "step_avg_ms", "record_eligible", "not_record_because")
    return {k: r.get(k) for k in keys}


def submission(args, runs, source_sha, reasons):
    """The submission.json dict (upstream records' schema plus ours), generated from the logs."""
    mean = {k: seeds.mean_std(seeds.column(runs, k)) for k in ("val_bpb", "val_loss")}
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "date": args.date,
        "track": "10min_16mb", "val_bpb": mean["val_bpb"][0], "val_bpb_std": mean["val_bpb"][1],
        "val_loss": mean["val_loss"][0], "val_loss_std": mean["val_loss"][1],
        "seeds": [r["seed"] for r in runs], "seed_results": {str(r["seed"]): seed_result(r) for r in runs},
        "bytes_total": max(r["artifact_bytes"] for r in runs), "bytes_code": runs[0]["code_bytes"],
        "hardware": hardware(runs), "pytorch_version": one_or_all([r.get("torch_version") for r in runs]),
        "technique_summary": args.blurb, "compliance": compliance(runs),
        "record": not reasons, "non_record_reasons": reasons,
        "mode": one_or_all([r.get("mode") for r in runs]),
        "legality": one_or_all([r.get("legality") for r in runs]),
        "config_hash": one_or_all([r.get("config_hash") for r in runs]), "source_sha256": source_sha,
        "world_size": one_or_all([r.get("world_size") for r in runs]),
        "env_overrides": one_or_all([seed_overrides(r) for r in runs]),
        "data": one_or_all([r.get("data") for r in runs]), "generated_by": "tools/package.py",
    }


def readme(sub, runs, data_cmd, data_note, tokenizer_rel):
    rows = seeds.table_rows([{**res, "seed": s} for s, res in sub["seed_results"].items()])
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows[:1] + [["---"] * len(rows[0])] + rows[1:])
    banner = "" if sub["record"] else ("\n> **NON-RECORD**: this folder does not back a record claim.\n"
                                       + "".join(f"> - {r}\n" for r in sub["non_record_reasons"]))
    step = (f"    {data_cmd}" if data_cmd else
            "    # no published export matches these runs' data: rebuild it with data/prepare.py "
            "(data/README.md)")
    fmt6 = lambda v: seeds.fmt(v, "{:.6f}")  # noqa: E731
    return README.substitute(
        name=sub["name"], banner=banner, blurb=sub["technique_summary"] or "(no description given)",
        table=table, n=len(sub["seeds"]), bpb_mean=fmt6(sub["val_bpb"]), bpb_std=fmt6(sub["val_bpb_std"]),
        loss_mean=fmt6(sub["val_loss"]), loss_std=fmt6(sub["val_loss_std"]),
        artifact_max=f"{sub['bytes_total']:,}", code_bytes=f"{sub['bytes_code']:,}",
        record="yes" if sub["record"] else "NO", mode=sub["mode"], legality=sub["legality"],
        compliance=", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in sub["compliance"].items()),
        config_hash=sub["config_hash"], source_sha256=sub["source_sha256"],
        hardware=sub["hardware"] or "-", torch=sub["pytorch_version"] or "-", data=data_note,
        data_step=step, commands=reproduce_commands(runs, sub["name"]),
        tokenizer_file=f", `{tokenizer_rel}`" if tokenizer_rel else "")


def folder_path(rel):
    """Where a run-relative path goes inside the folder (absolute or escaping paths: basename)."""
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm.startswith(".."):
        return os.path.join("data", "tokenizers", os.path.basename(norm))
    return norm


def copy_into(folder, src, rel):
    dst = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(dst) or folder, exist_ok=True)
    shutil.copyfile(src, dst)


def build(args, runs, packed, source, folder):
    """Write the folder; returns (submission dict, warnings)."""
    shipped = [{**r, "_path": f"train_seed{r['seed']}.log"} for r in runs]  # reasons name folder files
    reasons, warnings = folder_reasons(shipped), []
    data_path, tok_path = run_paths(runs, source)
    tok_src = args.tokenizer or (tok_path and os.path.join(args.repo_root, tok_path))
    if os.path.exists(folder):
        shutil.rmtree(folder)  # only reached with --force
    os.makedirs(folder)
    for name, data in (("train_gpt.py", packed), ("train_gpt_source.py", source)):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    for r in runs:
        shutil.copyfile(r["_path"], os.path.join(folder, f"train_seed{r['seed']}.log"))
    for rel in REPRO_FILES + args.extra:
        src = os.path.join(args.repo_root, rel)
        if os.path.isfile(src):
            copy_into(folder, src, rel)
        else:
            reasons.append(f"{rel} not found in {args.repo_root}: the folder cannot rebuild its data")
    tokenizer_rel = None
    if tok_src and os.path.isfile(tok_src):
        tokenizer_rel = folder_path(tok_path or os.path.basename(tok_src))
        copy_into(folder, tok_src, tokenizer_rel)
    else:
        warnings.append(f"tokenizer {tok_src or '(TOKENIZER_PATH unknown)'} not found; not copied "
                        "(the data step downloads it)")
    data_cmd, data_note = data_step(runs, data_path, tok_path)
    if data_cmd is None:
        warnings.append(f"no published export matches the runs' data ({data_note}); the README "
                        "points to data/prepare.py")
    if not args.blurb.strip():
        warnings.append("--blurb is empty: submission.json technique_summary and the README say "
                        "nothing about the technique")
    sub = submission(args, runs, hashlib.sha256(source).hexdigest(), reasons)
    with open(os.path.join(folder, "submission.json"), "w") as f:
        json.dump(sub, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme(sub, runs, data_cmd, data_note, tokenizer_rel))
    return sub, warnings


def dry_run(folder):
    """Start each entry point the folder holds with --help from inside it; (scripts, errors)."""
    scripts, errors = [s for s in HELP_CHECKS if os.path.isfile(os.path.join(folder, s))], []
    for script in scripts:
        try:
            r = subprocess.run([sys.executable, script, "--help"], cwd=folder,
                               capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            errors.append(f"python {script} --help did not finish within 300 s")
            continue
        if r.returncode != 0:
            errors.append(f"python {script} --help exited {r.returncode}:\n{(r.stdout + r.stderr)[-2000:]}")
    return scripts, errors


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Build and verify a record folder.")
    ap.add_argument("--name", required=True, help="folder suffix, e.g. SP8192_MyIdea")
    ap.add_argument("--logs", nargs="+", required=True, help="one log per seed (logs/<RUN_ID>.txt)")
    ap.add_argument("--source", default="train_gpt.py", help="readable source that ran")
    ap.add_argument("--packed", help="counted packed file that ran (default: pack --source now)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD")
    ap.add_argument("--repo-root", help="where data/, requirements.txt etc. live (default: --source's dir)")
    ap.add_argument("--out-root", help="default: <repo-root>/records/track_10min_16mb")
    ap.add_argument("--tokenizer", help="tokenizer to ship (default: the runs' TOKENIZER_PATH)")
    ap.add_argument("--extra", nargs="*", default=[], help="more repo-relative files to copy")
    ap.add_argument("--allow-import", nargs="*", default=[], help="extra top-level modules to allow")
    ap.add_argument("--allow-mixed", nargs="+", default=[], choices=MIXABLE, metavar="KEY",
                    help=f"package runs that differ in these ({', '.join(MIXABLE)}), as NON-RECORD")
    ap.add_argument("--author", default=None)
    ap.add_argument("--github-id", default=None)
    ap.add_argument("--blurb", default="", help="technique summary (submission.json technique_summary)")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    ap.add_argument("--dry-run-cmd", action="store_true",
                    help="after building, run train_gpt.py, data/prepare.py and data/download.py "
                         "with --help inside the folder")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name) or not re.fullmatch(r"\d{4}-\d\d-\d\d", args.date):
        ap.error("--name may use only letters, digits, '_', '.', '-'; --date must be YYYY-MM-DD")
    args.repo_root = args.repo_root or os.path.dirname(os.path.abspath(args.source))
    return args


def main(argv=None):
    args = parse_args(argv)
    out_root = args.out_root or os.path.join(args.repo_root, "records", "track_10min_16mb")
    folder = os.path.join(out_root, f"{args.date}_{args.name}")
    try:
        runs = [seeds.read_final(p) for p in args.logs]
        source = pack.read_source(args.source)
        if args.packed:
            with open(args.packed, "rb") as f:
                packed = f.read()
        else:
            packed = pack.pack_bytes(source, os.path.basename(args.source))
        problems = verify(runs, packed, source, args.source, args.packed or "packed --source", args.allow_mixed)
        problems += check_imports(args.source, args.allow_import)
    except (seeds.LogError, pack.PackError, OSError, SyntaxError) as e:
        print(f"package: {e}", file=sys.stderr)
        return 2
    if os.path.exists(folder) and not args.force:
        problems.append(f"{folder} already exists (pass --force to replace it)")
    if problems:
        print("package: refusing to build:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    sub, warnings = build(args, runs, packed, source, folder)
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    if not sub["record"]:
        print("=" * 60 + "\nWARNING: NON-RECORD folder:\n  " + "\n  ".join(sub["non_record_reasons"])
              + "\n" + "=" * 60, file=sys.stderr)
    print(f"wrote {folder}: val_bpb {seeds.fmt(sub['val_bpb'], '{:.6f}')} "
          f"+- {seeds.fmt(sub['val_bpb_std'], '{:.6f}')}, max artifact {sub['bytes_total']:,} bytes")
    if args.dry_run_cmd:
        scripts, errors = dry_run(folder)
        if errors:
            print(f"package: dry run failed in {folder}:\n" + "\n".join(errors), file=sys.stderr)
            return 2
        print("dry run: " + ", ".join(f"python {s} --help" for s in scripts) + " exited 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
