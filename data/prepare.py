"""Build, prove and smoke-test the token shards that train_gpt.py reads.

  python data/prepare.py --docs docs.jsonl.xz --variant caseops --out DIR \\
      --tokenizer-model fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model [--val-docs 50000]
  python data/prepare.py --docs ... --variant casefold --out DIR --train-tokenizer --vocab-size 8192
  python data/prepare.py verify DIR --docs docs.jsonl.xz [--val-docs N]   # the exact-bytes proof
  python data/prepare.py disjoint DIR                                     # no train doc equals a val doc
  python data/prepare.py smoke                                            # ./data/smoke, no download

Input: .jsonl, .jsonl.xz or .jsonl.zst files read in order, one {"text": ...} per line. The first
--val-docs documents (default 50,000, the challenge's split) are val, every later one is train.
Each document becomes [BOS=1] + sp.encode(transform(text)) (no EOS); documents flow across
10^8-token shards. CaseOps and casefold data also get fineweb_val_bytes_*.bin, the original UTF-8
bytes of every val token (README.md in this folder has the rule). manifest.json ties shards,
tokenizer and byte source together; train_gpt.load_data_spec refuses data that disagree with it.
"""

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import common  # noqa: E402
from data.common import (BOS_ID, CANONICAL_VAL_DOCS, SHARD_TOKENS, VARIANTS, DataError, log,  # noqa: E402
                         train_gpt)

CODE_FILES = ("lossless_caps.py", "data/common.py", "data/prepare.py")
SP_TRAINER_ARGS = dict(  # spec 1.4: the challenge's SentencePiece settings
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2,
    unk_id=3, hard_vocab_limit=False,
)
SP_TRAIN_THREADS = 16


def code_sha256() -> str:
    h = hashlib.sha256()
    for name in CODE_FILES:
        with open(os.path.join(common.REPO_ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def train_sentencepiece(lines, variant: str, vocab_size: int, model_path: str) -> None:
    """Train on transformed train docs (NUL -> space, stripped, empty skipped), as the challenge did.

    The model is taken from memory (no model_prefix) with a fixed thread count, because both are
    stored in the .model file: the same docs then give a byte-identical tokenizer on any machine.
    """
    import io

    import sentencepiece as spm

    used = [0]

    def sentences():
        for line in lines:
            text = common.transform_text(variant, common.doc_text(line)).replace("\x00", " ").strip()
            if text:
                used[0] += 1
                yield text

    extra = {"user_defined_symbols": list(common.lossless_caps.CONTROLS)} if variant == "caseops" else {}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
                                       num_threads=SP_TRAIN_THREADS, minloglevel=2, **SP_TRAINER_ARGS, **extra)
    except RuntimeError as e:
        if not used[0]:
            raise DataError("no train documents to train the tokenizer on (all docs are val?)") from None
        raise DataError(f"SentencePiece training failed: {e}") from None
    with open(model_path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(model_path + ".tmp", model_path)


def check_tokenizer(sp, variant: str) -> int:
    vocab = sp.get_piece_size()
    if vocab > 2**16:
        raise DataError(f"vocab {vocab} does not fit the uint16 shards")
    if sp.bos_id() != BOS_ID:
        raise DataError(f"tokenizer bos_id is {sp.bos_id()}, shards need {BOS_ID}")
    if variant == "caseops":
        for c in common.lossless_caps.CONTROLS:
            i = sp.piece_to_id(c)
            if i == sp.unk_id() or sp.is_byte(i) or sp.is_control(i):
                raise DataError(f"caseops tokenizer lacks the marker U+{ord(c):04X} as its own piece")
    train_gpt.build_byte_lut(sp, vocab)  # refuses a tokenizer without a standalone '▁'
    return vocab


def _jobs(lines, val_docs: int, val_bytes: bool, chunk_docs: int):
    """(split, lines, with_bytes) chunks; a chunk never mixes val and train docs."""
    val = list(itertools.islice(lines, val_docs))
    for i in range(0, len(val), chunk_docs):
        yield "val", val[i:i + chunk_docs], val_bytes
    del val
    while True:
        chunk = list(itertools.islice(lines, chunk_docs))
        if not chunk:
            return
        yield "train", chunk, False


def _files_present(out: str, man: dict) -> bool:
    groups = [man["val"]["shards"], man["val"]["byte_shards"], man["train"]["shards"]]
    for s in itertools.chain(*groups):
        p = os.path.join(out, s["name"])
        if not os.path.isfile(p) or os.path.getsize(p) != 4 * train_gpt.HEADER_INTS + 2 * s["tokens"]:
            return False
    return os.path.isfile(os.path.join(out, man["tokenizer"]["file"]))


def build(docs, variant, out, *, tokenizer_model=None, train_tokenizer=False, vocab_size=8192,
          val_docs=CANONICAL_VAL_DOCS, max_train_tokens=None, workers=None, tokenizer_train_docs=None,
          tokenizer_name=None, shard_tokens=SHARD_TOKENS, min_last_shard=0, chunk_docs=256, force=False):
    """Tokenize `docs` into `out` and write manifest.json; returns the manifest."""
    if variant not in VARIANTS:
        raise DataError(f"--variant {variant!r}: use one of {sorted(VARIANTS)}")
    if bool(tokenizer_model) == bool(train_tokenizer):
        raise DataError("give exactly one of --tokenizer-model MODEL or --train-tokenizer")
    if val_docs < 1:
        raise DataError("--val-docs must be >= 1")
    workers = workers or os.cpu_count() or 1
    transform, byte_source = VARIANTS[variant]
    os.makedirs(out, exist_ok=True)
    # paths relative to the dataset dir, so the manifest does not depend on the working directory
    sources = [{"path": os.path.relpath(p, out), "sha256": train_gpt.sha256_file(p)} for p in docs]
    tok_key = ({"model_sha256": train_gpt.sha256_file(tokenizer_model)} if tokenizer_model else
               {"train": {"vocab_size": vocab_size, "train_docs": tokenizer_train_docs, "name": tokenizer_name}})
    key = {"variant": variant, "val_docs": val_docs, "max_train_tokens": max_train_tokens,
           "shard_tokens": shard_tokens, "min_last_shard": min_last_shard, "sources": sources,
           "tokenizer": tok_key, "code_sha256": code_sha256()}
    mpath = os.path.join(out, "manifest.json")
    if not force and os.path.isfile(mpath):
        old = json.load(open(mpath))
        if old.get("build") == key and _files_present(out, old):
            log(f"{out}: up to date (manifest.json matches these inputs; --force rebuilds)")
            return old
    for name in os.listdir(out):  # a failed or different build never leaves a stale manifest
        if name == "manifest.json" or (name.startswith("fineweb_") and name.endswith((".bin", ".bin.tmp"))):
            os.remove(os.path.join(out, name))

    if train_tokenizer:
        tok_path = os.path.join(out, (tokenizer_name or f"{variant}_{vocab_size}") + ".model")
        stop = None if tokenizer_train_docs is None else val_docs + tokenizer_train_docs
        log(f"training a {variant} SentencePiece BPE (vocab {vocab_size}) on train docs only "
            f"({'all' if stop is None else tokenizer_train_docs} after the first {val_docs})")
        lines = itertools.islice(common.iter_doc_lines(docs), val_docs, stop)
        train_sentencepiece(lines, variant, vocab_size, tok_path)
    else:
        tok_path = os.path.join(out, os.path.basename(tokenizer_model))
        if not os.path.exists(tok_path) or not os.path.samefile(tokenizer_model, tok_path):
            shutil.copyfile(tokenizer_model, tok_path)
    import sentencepiece as spm

    vocab = check_tokenizer(spm.SentencePieceProcessor(model_file=tok_path), variant)

    sidecar = byte_source == "sidecar"
    writers = {"val": common.ShardWriter(out, "fineweb_val_%06d.bin", shard_tokens, min_last_shard),
               "train": common.ShardWriter(out, "fineweb_train_%06d.bin", shard_tokens, min_last_shard)}
    side_writer = common.ShardWriter(out, "fineweb_val_bytes_%06d.bin", shard_tokens, min_last_shard)
    ndocs, raw_val = {"val": 0, "train": 0}, 0
    progress = common.Progress("tokenize")
    jobs = _jobs(common.iter_doc_lines(docs), val_docs, sidecar, chunk_docs)
    for split, tokens, side, lengths, raw in common.ordered_map(jobs, tok_path, variant, workers):
        if split == "train" and max_train_tokens is not None:
            room = max_train_tokens - writers["train"].total
            keep = int(np.searchsorted(np.cumsum(lengths) - lengths, room, side="left"))
            if keep < lengths.size:  # whole docs only: the last doc kept may cross the limit
                tokens, lengths = tokens[: int(lengths[:keep].sum())], lengths[:keep]
        writers[split].add(tokens)
        if split == "val":
            raw_val += raw
            if sidecar:
                side_writer.add(side)
        ndocs[split] += lengths.size
        progress(sum(ndocs.values()), writers["val"].total + writers["train"].total)
        if max_train_tokens is not None and writers["train"].total >= max_train_tokens:
            break
    progress(sum(ndocs.values()), writers["val"].total + writers["train"].total, force=True)
    if ndocs["val"] < val_docs:
        raise DataError(f"--docs hold only {ndocs['val']} documents, fewer than --val-docs {val_docs}")
    if ndocs["train"] == 0:
        raise DataError(f"no train documents after the first {val_docs} (val) documents")
    val_shards, train_shards = writers["val"].close(), writers["train"].close()
    byte_shards = side_writer.close() if sidecar else []

    val_files = [os.path.join(out, s["name"]) for s in val_shards]
    common.check_disjoint(val_files, [os.path.join(out, s["name"]) for s in train_shards])
    tok_sha = train_gpt.sha256_file(tok_path)
    man = {
        "format_version": 1, "variant": variant, "text_transform": transform, "byte_source": byte_source,
        "tokenizer": {"file": os.path.basename(tok_path), "sha256": tok_sha, "vocab_size": vocab, "bos_id": BOS_ID},
        "val": {"docs": ndocs["val"], "tokens": writers["val"].total, "raw_bytes": raw_val, "scored_bytes": None,
                "shards": val_shards, "byte_shards": byte_shards},
        "train": {"docs": ndocs["train"], "tokens": writers["train"].total, "shards": train_shards},
        "sources": sources, "disjoint_checked": True, "build": key,
    }
    common.finish_manifest(out, man, tok_path)
    log(f"{out}: val {ndocs['val']:,} docs / {writers['val'].total:,} tokens / "
        f"{man['val']['scored_bytes']:,} scored bytes ({raw_val:,} raw); train {ndocs['train']:,} docs / "
        f"{writers['train'].total:,} tokens in {len(train_shards)} shards; tokenizer {os.path.basename(tok_path)}")
    return man


# Smoke corpus ---------------------------------------------------------------------------------

SMOKE_VAL_DOCS = 450


def smoke_docs() -> list:
    """English paragraphs of the Python reference docs that ship inside CPython (pydoc_data).

    Deduplicated up to whitespace (so val and train are disjoint) and shuffled with a fixed seed.
    """
    from pydoc_data.topics import topics

    seen, docs = set(), []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            key = " ".join(para.split())
            if key and key not in seen:
                seen.add(key)
                docs.append(para)
    random.Random(1337).shuffle(docs)
    return docs


def smoke(out=None, workers=None, force=False) -> dict:
    """Build the CPU smoke dataset read by `SMOKE=1 python train_gpt.py`."""
    out = out or os.path.join(common.REPO_ROOT, "data", "smoke")
    os.makedirs(out, exist_ok=True)
    docs_path = os.path.join(out, "smoke_docs.jsonl")
    payload = "".join(json.dumps({"text": d}) + "\n" for d in smoke_docs())
    if not os.path.isfile(docs_path) or open(docs_path).read() != payload:
        with open(docs_path, "w") as f:
            f.write(payload)
    preset = train_gpt.SMOKE_PRESET
    man = build([docs_path], "caseops", out, train_tokenizer=True, vocab_size=preset["vocab_size"],
                val_docs=SMOKE_VAL_DOCS, workers=workers, tokenizer_name="smoke_caseops_1024",
                shard_tokens=40_000, min_last_shard=20_000, force=force)
    batch = preset["train_batch_tokens"] + 1
    if man["tokenizer"]["vocab_size"] != preset["vocab_size"]:
        raise DataError(f"smoke tokenizer has {man['tokenizer']['vocab_size']} pieces, SMOKE needs "
                        f"{preset['vocab_size']}")
    if min(s["tokens"] for s in man["train"]["shards"]) < 2 * batch or man["val"]["tokens"] < 20_000:
        raise DataError("smoke corpus too small for the SMOKE preset")
    return man


# CLI ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        from data.verify import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["disjoint"]:
        ap = argparse.ArgumentParser(prog="prepare.py disjoint", description=common.check_disjoint.__doc__)
        ap.add_argument("dir", help="dataset directory with manifest.json (DATA_PATH)")
        a = ap.parse_args(argv[1:])
        try:
            log(f"{a.dir}: {common.check_disjoint_dir(a.dir):,} val docs, none of them in the train shards")
        except (DataError, OSError) as e:
            log(f"error: {e}")
            return 1
        return 0
    if argv[:1] == ["smoke"]:
        ap = argparse.ArgumentParser(prog="prepare.py smoke", description=smoke.__doc__)
        ap.add_argument("--out", default=None, help="default: <repo>/data/smoke")
        ap.add_argument("--workers", type=int, default=None)
        ap.add_argument("--force", action="store_true")
        a = ap.parse_args(argv[1:])
        smoke(a.out, a.workers, a.force)
        return 0
    ap = argparse.ArgumentParser(prog="prepare.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", nargs="+", required=True, help=".jsonl/.jsonl.xz/.jsonl.zst, read in order")
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--out", required=True, help="dataset directory (DATA_PATH for train_gpt.py)")
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", help="an existing SentencePiece .model (copied into --out)")
    tok.add_argument("--train-tokenizer", action="store_true", help="train one on the train docs (never val)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="with --train-tokenizer")
    ap.add_argument("--tokenizer-train-docs", type=int, default=None,
                    help="with --train-tokenizer: use only the first K train docs (default all)")
    ap.add_argument("--tokenizer-name", default=None, help="trained model file stem (default <variant>_<V>)")
    ap.add_argument("--val-docs", type=int, default=CANONICAL_VAL_DOCS,
                    help=f"the first N docs are val (default {CANONICAL_VAL_DOCS:,}, the challenge's split)")
    ap.add_argument("--max-train-tokens", type=int, default=None,
                    help="stop after the train doc that reaches T tokens (whole docs only)")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help=argparse.SUPPRESS)
    ap.add_argument("--force", action="store_true", help="rebuild even if manifest.json matches the inputs")
    a = ap.parse_args(argv)
    try:
        build(a.docs, a.variant, a.out, tokenizer_model=a.tokenizer_model, train_tokenizer=a.train_tokenizer,
              vocab_size=a.vocab_size, val_docs=a.val_docs, max_train_tokens=a.max_train_tokens,
              workers=a.workers, tokenizer_train_docs=a.tokenizer_train_docs, tokenizer_name=a.tokenizer_name,
              shard_tokens=a.shard_tokens, force=a.force)
    except DataError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
