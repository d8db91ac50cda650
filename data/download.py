"""Download a published challenge export and write our manifest.json next to it.

  python data/download.py --variant caseops                  # romeerp/parameter-golf-caseops-v1
  python data/download.py --variant sp8192 --train-shards 80  # kevclark/parameter-golf
  python data/download.py --variant caseops --from-local DIR  # DIR laid out like the hub repo

Hub layout (spec 1.3): <root>/manifest.json, <root>/datasets/<dataset>/fineweb_{val,train}_NNNNNN.bin
(+ fineweb_val_bytes_NNNNNN.bin for CaseOps) and <root>/tokenizers/<model>, with <root> = "datasets"
(MATCHED_FINEWEB_REMOTE_ROOT_PREFIX). MATCHED_FINEWEB_REPO_ID replaces the repo id. Every val shard
(the canonical 50,000-doc split) and the first --train-shards train shards are fetched into --out,
checked against the hub's LFS sha256 where it reports one, and recorded with their sha256 in our
manifest.json, which train_gpt.py validates before training.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import common  # noqa: E402
from data.common import BOS_ID, CANONICAL_VAL_DOCS, VARIANTS, DataError, log, train_gpt  # noqa: E402

EXPORTS = {
    "sp8192": dict(repo="kevclark/parameter-golf", dataset="fineweb10B_sp8192", variant="sp",
                   tokenizer="fineweb_8192_bpe.model", out="data/datasets/fineweb10B_sp8192"),
    "caseops": dict(repo="romeerp/parameter-golf-caseops-v1",
                    dataset="fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", variant="caseops",
                    tokenizer="fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                    out="data/datasets/fineweb10B_sp8192_caseops"),
}


class HubFetcher:
    """Files of a Hugging Face dataset repo, through huggingface_hub (its cache, then a link)."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def fetch(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(repo_id=self.repo_id, filename=filename, repo_type="dataset")
        except Exception as e:  # LocalEntryNotFoundError (offline), HTTP errors, ...
            raise DataError(
                f"cannot download {filename} from hf://datasets/{self.repo_id} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Offline or blocked? Check the network / HF_ENDPOINT, "
                "or mirror the repo elsewhere and run with --from-local DIR") from None

    def sha256(self, filenames) -> dict:
        """The hub's LFS sha256 of each file (files stored without LFS have none)."""
        from huggingface_hub import HfApi

        try:
            infos = HfApi().get_paths_info(self.repo_id, list(filenames), repo_type="dataset")
        except Exception as e:
            log(f"warning: could not read sha256 sums from the hub ({type(e).__name__}); "
                "files are hashed locally only")
            return {}
        return {i.path: i.lfs.sha256 for i in infos if getattr(i, "lfs", None)}


class LocalFetcher:
    """A directory laid out like the hub repo (a mirror, or a test fixture)."""

    def __init__(self, root: str, sums=None):
        self.root, self.sums = root, sums or {}

    def fetch(self, filename: str) -> str:
        path = os.path.join(self.root, filename)
        if not os.path.isfile(path):
            raise DataError(f"--from-local {self.root}: missing {filename}")
        return path

    def sha256(self, filenames) -> dict:
        return {f: self.sums[f] for f in filenames if f in self.sums}


def place(src: str, dst: str) -> None:
    """Hard-link when possible (no second copy of 16 GB), else copy."""
    if os.path.exists(dst):
        if os.path.samefile(src, dst):
            return
        os.remove(dst)
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def count_docs(files) -> int:
    return sum(int(np.count_nonzero(train_gpt.read_shard(f) == BOS_ID)) for f in files)


def download(export: str, out=None, train_shards=80, fetcher=None, tokenizer_dir=None, root=None,
             check_disjoint=True) -> dict:
    ex = dict(EXPORTS[export])
    ex["repo"] = os.environ.get("MATCHED_FINEWEB_REPO_ID", ex["repo"])
    root = root if root is not None else os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
    fetcher = fetcher or HubFetcher(ex["repo"])
    out = out or os.path.join(common.REPO_ROOT, ex["out"])
    tokenizer_dir = tokenizer_dir or os.path.join(common.REPO_ROOT, "data", "tokenizers")
    prefix = f"{root}/" if root else ""

    hub_man = json.load(open(fetcher.fetch(f"{prefix}manifest.json")))
    entry = next((d for d in hub_man.get("datasets", []) if d.get("name") == ex["dataset"]), None)
    if entry is None:
        names = [d.get("name") for d in hub_man.get("datasets", [])]
        raise DataError(f"{ex['repo']}: no dataset {ex['dataset']} in {prefix}manifest.json (has {names}); "
                        "delete any stale local manifest or check MATCHED_FINEWEB_REPO_ID")
    stats = entry.get("stats") or {}
    files_val, files_train = int(stats.get("files_val", 1)), int(stats.get("files_train", train_shards))
    if train_shards > files_train:
        raise DataError(f"--train-shards {train_shards}: {ex['repo']} has only {files_train}")
    tok_entry = next((t for t in hub_man.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
    tok_remote = prefix + tok_entry.get("model_path", f"tokenizers/{ex['tokenizer']}")

    variant = ex["variant"]
    transform, byte_source = VARIANTS[variant]
    ddir = f"{prefix}datasets/{ex['dataset']}/"
    names = [f"fineweb_val_{i:06d}.bin" for i in range(files_val)]
    byte_names = [f"fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)] if byte_source == "sidecar" else []
    train_names = [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    remote = [ddir + n for n in names + byte_names + train_names] + [tok_remote]
    expected = fetcher.sha256(remote)

    os.makedirs(out, exist_ok=True)
    os.makedirs(tokenizer_dir, exist_ok=True)
    for stale in set(os.listdir(out)) - set(names + byte_names + train_names):
        if stale == "manifest.json" or (stale.startswith("fineweb_") and stale.endswith(".bin")):
            log(f"removing {stale} from {out} (not part of this download)")
            os.remove(os.path.join(out, stale))
    records = {}
    for k, rel in enumerate(remote):
        dst = os.path.join(out, os.path.basename(rel))
        place(fetcher.fetch(rel), dst)
        sha = train_gpt.sha256_file(dst)
        if rel in expected and expected[rel] != sha:
            os.remove(dst)
            raise DataError(f"{rel}: sha256 {sha} differs from the hub's {expected[rel]}; download again")
        records[os.path.basename(rel)] = {"name": os.path.basename(rel), "sha256": sha}
        log(f"[{k + 1}/{len(remote)}] {rel} ok ({'hub sha256 matched' if rel in expected else 'sha256 recorded'})")
    tok_path = os.path.join(out, os.path.basename(tok_remote))
    place(tok_path, os.path.join(tokenizer_dir, os.path.basename(tok_remote)))

    def shard_entries(group):
        return [dict(records[n], tokens=int(train_gpt.read_shard(os.path.join(out, n)).size)) for n in group]

    import sentencepiece as spm

    val_files = [os.path.join(out, n) for n in names]
    train_files = [os.path.join(out, n) for n in train_names]
    val_docs = count_docs(val_files)
    want_docs = int(stats.get("docs_val", hub_man.get("num_val_docs", CANONICAL_VAL_DOCS)))
    if val_docs != want_docs:
        raise DataError(f"{out}: val shards hold {val_docs} docs, the export says {want_docs}")
    if check_disjoint:
        common.check_disjoint(val_files, train_files)
    val_entries, train_entries = shard_entries(names), shard_entries(train_names)
    man = {
        "format_version": 1, "variant": variant, "text_transform": transform, "byte_source": byte_source,
        "tokenizer": {"file": os.path.basename(tok_path), "sha256": records[os.path.basename(tok_path)]["sha256"],
                      "vocab_size": spm.SentencePieceProcessor(model_file=tok_path).get_piece_size(),
                      "bos_id": BOS_ID},
        "val": {"docs": val_docs, "tokens": sum(s["tokens"] for s in val_entries),
                "raw_bytes": None,  # the source docs are not downloaded; prepare.py verify has them
                "scored_bytes": None, "shards": val_entries, "byte_shards": shard_entries(byte_names)},
        "train": {"docs": count_docs(train_files), "tokens": sum(s["tokens"] for s in train_entries),
                  "shards": train_entries},
        "sources": [{"path": f"hf://datasets/{ex['repo']}/{rel}", "sha256": records[os.path.basename(rel)]["sha256"]}
                    for rel in remote],
        "disjoint_checked": bool(check_disjoint),
    }
    common.finish_manifest(out, man, tok_path)
    log(f"{out}: {export} from {ex['repo']}: val {val_docs:,} docs / {man['val']['tokens']:,} tokens / "
        f"{man['val']['scored_bytes']:,} scored bytes; {train_shards} train shards; "
        f"tokenizer also in {tokenizer_dir}")
    return man


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="download.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(EXPORTS), required=True)
    ap.add_argument("--train-shards", type=int, default=80, help="first K train shards (default 80)")
    ap.add_argument("--out", default=None, help="dataset dir (default data/datasets/fineweb10B_sp8192[_caseops])")
    ap.add_argument("--tokenizer-dir", default=None, help="also place the tokenizer here (default data/tokenizers)")
    ap.add_argument("--from-local", default=None, help="read a directory laid out like the hub repo instead")
    ap.add_argument("--no-check-disjoint", action="store_true", help="skip the train/val doc-hash check")
    a = ap.parse_args(argv)
    try:
        download(a.variant, a.out, a.train_shards, LocalFetcher(a.from_local) if a.from_local else None,
                 a.tokenizer_dir, check_disjoint=not a.no_check_disjoint)
    except DataError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
