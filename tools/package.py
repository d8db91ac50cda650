#!/usr/bin/env python3
"""Build and verify a record folder records/track_10min_16mb/<date>_<name>/.

    python tools/package.py --name my_run --logs logs/r_seed42.txt logs/r_seed0.txt ... \\
        --source train_gpt.py --packed out/train_gpt.py [--dry-run-cmd]

Every number in the folder is regenerated from the logs' final_json lines and re-checked
against the shipped files: the counted train_gpt.py (the packed loader), its readable source
train_gpt_source.py, the per-seed logs, submission.json and README.md. Hard problems (sizes,
hashes, config mismatch, disallowed imports) refuse with exit 2 and write nothing; non-record
runs are packaged but stamped NON-RECORD. Stdlib only.
"""
import argparse
import ast
import datetime
import hashlib
import json
import os
import re
import shutil
import string
import subprocess
import sys

import pack
import seeds

CAP_BYTES = 16_000_000
ALLOWED_IMPORTS = {"torch", "numpy", "sentencepiece", "brotli", "flash_attn_interface", "triton"}
OPTIONAL_FILES = ["requirements.txt", "lossless_caps.py", "data/prepare.py"]
# Calls that load code from another file; counted code must not hide behind them.
FILE_LOADERS = {"run_path", "spec_from_file_location", "SourceFileLoader", "load_source", "exec_module"}
README = string.Template("""\
# $name
$banner
Mean val_bpb **$bpb_mean** (std $bpb_std) and val_loss $loss_mean nats (std $loss_std) over
$n seeds. Largest artifact: $artifact_max bytes (code $code_bytes + model), cap 16,000,000.

$table

* mode: $mode; legality: $legality
* config_hash: `$config_hash`
* source_sha256: `$source_sha256` (of `train_gpt_source.py`)
* hardware: $hardware

## Files

* `train_gpt.py`: the counted file, a self-extracting loader of `train_gpt_source.py`
  (built by `tools/pack.py`; `python tools/pack.py train_gpt_source.py -o train_gpt.py --name
  train_gpt.py --check` re-verifies it).
* `train_gpt_source.py`: the readable source that ran (not counted; same sha256 as logged).
* `train_seed<seed>.log`: one training log per seed; `submission.json` is generated from them.

## Reproduce

    for SEED in $seed_list; do SEED=$$SEED torchrun --standalone --nproc_per_node=8 train_gpt.py; done
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


def verify(runs, packed, source, source_path, packed_name):
    """Hard problems that make the folder unusable (empty list = fine)."""
    problems = seeds.pooling_problems(runs, allow_mixed=True)  # config_hash must match
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
    if None in seed_list or len(set(seed_list)) != len(seed_list):
        problems.append(f"seeds must be present and distinct across --logs, got {seed_list}")
    return problems


def read_device(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("device:")), None)


def one_or_all(values):
    """A single value if all runs agree, else the per-run list (so disagreement stays visible)."""
    return values[0] if len(set(map(str, values))) == 1 else values


def submission(args, runs, source_sha, reasons):
    """The submission.json dict, generated only from the logs."""
    mean = {k: seeds.mean_std(seeds.column(runs, k)) for k in ("val_bpb", "val_loss")}
    hardware = sorted({d for d in (read_device(r["_path"]) for r in runs) if d})
    keys = ("seed", "val_bpb", "val_loss", "artifact_bytes", "steps", "step_avg_ms", "eval_strict_s")
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": args.date, "val_bpb": mean["val_bpb"][0], "val_bpb_std": mean["val_bpb"][1],
        "val_loss": mean["val_loss"][0], "val_loss_std": mean["val_loss"][1],
        "bytes_total": max(r["artifact_bytes"] for r in runs), "bytes_code": runs[0]["code_bytes"],
        "seeds": [{k: r.get(k) for k in keys} for r in runs],
        "config_hash": runs[0].get("config_hash"), "source_sha256": source_sha,
        "mode": one_or_all([r.get("mode") for r in runs]),
        "legality": one_or_all([r.get("legality") for r in runs]),
        "non_record": bool(reasons), "non_record_reasons": reasons,
        "hardware": "; ".join(hardware) or None, "generated_by": "tools/package.py",
    }


def readme(sub):
    rows = seeds.table_rows(sub["seeds"])
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows[:1] + [["---"] * len(rows[0])] + rows[1:])
    banner = ("\n> **NON-RECORD**: not a record claim.\n" + "".join(
        f"> - {r}\n" for r in sub["non_record_reasons"])) if sub["non_record"] else ""
    return README.substitute(
        name=sub["name"], banner=banner, table=table, n=len(sub["seeds"]),
        bpb_mean=seeds.fmt(sub["val_bpb"], "{:.6f}"), bpb_std=seeds.fmt(sub["val_bpb_std"], "{:.6f}"),
        loss_mean=seeds.fmt(sub["val_loss"], "{:.6f}"), loss_std=seeds.fmt(sub["val_loss_std"], "{:.6f}"),
        artifact_max=f"{sub['bytes_total']:,}", code_bytes=f"{sub['bytes_code']:,}",
        mode=sub["mode"], legality=sub["legality"], config_hash=sub["config_hash"],
        source_sha256=sub["source_sha256"], hardware=sub["hardware"] or "-",
        seed_list=" ".join(str(s["seed"]) for s in sub["seeds"]))


def build(args, runs, packed, source, folder):
    """Write the folder; returns the submission dict."""
    reasons = seeds.non_record_reasons(runs)
    sub = submission(args, runs, hashlib.sha256(source).hexdigest(), reasons)
    if os.path.exists(folder):
        shutil.rmtree(folder)  # only reached with --force
    os.makedirs(folder)
    for name, data in (("train_gpt.py", packed), ("train_gpt_source.py", source)):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    for r in runs:
        shutil.copyfile(r["_path"], os.path.join(folder, f"train_seed{r['seed']}.log"))
    for rel in OPTIONAL_FILES + args.extra:
        src = os.path.join(args.repo_root, rel)
        if not os.path.isfile(src):
            print(f"note: {src} not found; not copied")
            continue
        os.makedirs(os.path.dirname(os.path.join(folder, rel)) or folder, exist_ok=True)
        shutil.copyfile(src, os.path.join(folder, rel))
    with open(os.path.join(folder, "submission.json"), "w") as f:
        json.dump(sub, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme(sub))
    return sub


def dry_run(folder):
    """Start the packaged script from inside the folder; return an error message or None."""
    try:
        r = subprocess.run([sys.executable, "train_gpt.py", "--help"], cwd=folder,
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "python train_gpt.py --help did not finish within 300 s"
    if r.returncode != 0:
        return f"python train_gpt.py --help exited {r.returncode}:\n{(r.stdout + r.stderr)[-2000:]}"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build and verify a record folder.")
    ap.add_argument("--name", required=True, help="folder suffix, e.g. SP8192_MyIdea")
    ap.add_argument("--logs", nargs="+", required=True, help="one log per seed (logs/<RUN_ID>.txt)")
    ap.add_argument("--source", default="train_gpt.py", help="readable source that ran")
    ap.add_argument("--packed", help="counted packed file that ran (default: pack --source now)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD")
    ap.add_argument("--repo-root", help="where requirements.txt etc. live (default: --source's dir)")
    ap.add_argument("--out-root", help="default: <repo-root>/records/track_10min_16mb")
    ap.add_argument("--extra", nargs="*", default=[], help="more repo-relative files to copy")
    ap.add_argument("--allow-import", nargs="*", default=[], help="extra top-level modules to allow")
    ap.add_argument("--author", default=None)
    ap.add_argument("--github-id", default=None)
    ap.add_argument("--blurb", default="")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    ap.add_argument("--dry-run-cmd", action="store_true",
                    help="after building, run `python train_gpt.py --help` inside the folder")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name) or not re.fullmatch(r"\d{4}-\d\d-\d\d", args.date):
        ap.error("--name may use only letters, digits, '_', '.', '-'; --date must be YYYY-MM-DD")
    args.repo_root = args.repo_root or os.path.dirname(os.path.abspath(args.source))
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
        problems = verify(runs, packed, source, args.source, args.packed or "packed --source")
        problems += check_imports(args.source, args.allow_import)
    except (seeds.LogError, pack.PackError, OSError, SyntaxError) as e:
        print(f"package: {e}", file=sys.stderr)
        return 2
    if os.path.exists(folder) and not args.force:
        problems.append(f"{folder} already exists (pass --force to replace it)")
    if problems:
        print("package: refusing to build:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    sub = build(args, runs, packed, source, folder)
    if sub["non_record"]:
        print("WARNING: NON-RECORD folder:\n  " + "\n  ".join(sub["non_record_reasons"]), file=sys.stderr)
    print(f"wrote {folder}: val_bpb {seeds.fmt(sub['val_bpb'], '{:.6f}')} "
          f"+- {seeds.fmt(sub['val_bpb_std'], '{:.6f}')}, "
          f"max artifact {sub['bytes_total']:,} bytes")
    if args.dry_run_cmd:
        error = dry_run(folder)
        if error:
            print(f"package: dry run failed in {folder}: {error}", file=sys.stderr)
            return 2
        print("dry run: python train_gpt.py --help exited 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
