"""The exact-bytes proof: `python data/prepare.py verify DIR --docs FILE [FILE ...] [--val-docs N]`.

It loads the val split through train_gpt's own loader (load_data_spec + load_val_data, i.e. the
numbers the score divides by), splits it at BOS, and checks every document against its source:

1. Tokens: sp.decode(doc) == normalize(transform(source)), where normalize is SentencePiece's own
   normalizer (nmt_nfkc, whitespace runs collapsed to one space, leading/trailing whitespace
   dropped; `▁` read as a space) and transform is none / caseops_encode / casefold.
   CaseOps also checks caseops_decode(caseops_encode(source)) == source (the transform is lossless)
   and reports, without failing, the docs where caseops_decode(decoded tokens) != normalize(source):
   SentencePiece's NFKC runs after the transform, so e.g. "ﬁ" + a marked word or "E" + U+0301
   can yield a stream the decoder rejects. Bytes are unaffected (they come from the surfaces).
2. Bytes (per document, the bytes train_gpt assigns to its targets):
   * sidecar (caseops, casefold): == UTF-8 bytes of the source minus the leading/trailing chars
     SentencePiece drops (common.EdgeRule: whitespace and removable controls at the edges).
     Interior whitespace runs and NFKC-changed chars count their full original length.
   * lut (sp): == UTF-8 bytes of the normalized text (what the piece table can count).
3. Totals: docs and tokens == manifest; scored bytes == manifest scored_bytes == the sum of the
   per-document expectations; raw bytes == manifest raw_bytes.
It prints a table and exits 1 on any mismatch.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import common  # noqa: E402
from data.common import DataError, lossless_caps, train_gpt  # noqa: E402


def expected_doc(variant: str, src: str, sp, edge):
    """(normalized text the tokens must decode to, bytes the doc must score, transform ok)."""
    if variant == "sp":
        norm = common.sentencepiece_normalized(sp, src)
        return norm, len(norm.encode("utf-8")), True
    if variant == "caseops":
        t = lossless_caps.caseops_encode(src)
        a, b = edge.content_span(src)  # the transform touches letters only: same edges as src
        lossless = lossless_caps.caseops_decode(t) == src
        return common.sentencepiece_normalized(sp, t), len(src[a:b].encode("utf-8")), lossless
    f = lossless_caps.casefold(src)
    a, b = edge.content_span(f)
    return common.sentencepiece_normalized(sp, f), lossless_caps.casefold_piece_bytes(src, [(a, b)])[0], True


def verify(data_dir: str, docs, val_docs=None, out=sys.stdout) -> dict:
    import sentencepiece as spm

    man = json.load(open(os.path.join(data_dir, "manifest.json")))
    variant, tok_path = man["variant"], os.path.join(data_dir, man["tokenizer"]["file"])
    h = train_gpt.load_config({"DATA_PATH": data_dir, "TOKENIZER_PATH": tok_path,
                               "VOCAB_SIZE": str(man["tokenizer"]["vocab_size"])})
    spec = train_gpt.load_data_spec(h, val_sha256=False)  # the scorer would refuse a changed file...
    spec.scored_bytes = None  # ...or a wrong total; here both are reported, and the docs they touch
    vd = train_gpt.load_val_data(spec, h)
    tokens, tb = vd.tokens.numpy(), vd.target_bytes.numpy()
    starts = common.doc_starts(tokens)
    if starts.size == 0 or starts[0] != 0:
        raise DataError(f"{data_dir}: val stream does not start with BOS")
    ends = np.append(starts[1:], tokens.size)
    cum = np.concatenate([[0], np.cumsum(tb)])
    doc_bytes = cum[ends - 1] - cum[np.maximum(starts - 1, 0)]  # targets starts[k]..ends[k]-1
    n_want = val_docs if val_docs is not None else man["val"]["docs"]

    sp = spm.SentencePieceProcessor(model_file=tok_path)
    edge = common.EdgeRule(sp)
    raw = expected_total = n_src = 0
    text_bad, bytes_bad, lossy, not_invertible = [], [], [], []
    progress = common.Progress("verify")
    for k, src in enumerate(common.iter_docs(docs, limit=n_want)):
        n_src += 1
        raw += len(src.encode("utf-8"))
        if k >= starts.size:
            continue
        norm, want_bytes, lossless = expected_doc(variant, src, sp, edge)
        expected_total += want_bytes
        decoded = sp.decode(tokens[starts[k] + 1:ends[k]].tolist())
        if decoded != norm:
            text_bad.append(k)
        if variant == "caseops":
            try:
                inverted = lossless_caps.caseops_decode(decoded) == common.sentencepiece_normalized(sp, src)
            except ValueError:
                inverted = False
            if not inverted:
                not_invertible.append(k)
        if not lossless:
            lossy.append(k)
        if doc_bytes[k] != want_bytes:
            bytes_bad.append((k, int(doc_bytes[k]), want_bytes))
        progress(k + 1, int(ends[k]))
    scored = int(tb.sum())
    checks = {
        f"val docs in shards == {n_want} source docs": starts.size == n_want == n_src,
        "val docs == manifest": starts.size == man["val"]["docs"],
        "val tokens == manifest": tokens.size == man["val"]["tokens"],
        "val shards' sha256 == manifest": all(
            train_gpt.sha256_file(os.path.join(data_dir, s["name"])) == s["sha256"]
            for s in man["val"]["shards"] + man["val"]["byte_shards"]),
        "raw bytes == manifest": man["val"].get("raw_bytes") in (None, raw),
        "scored bytes == manifest scored_bytes": scored == man["val"]["scored_bytes"],
        "scored bytes == sum of per-doc expectations": scored == expected_total,
        "every doc decodes to its normalized source": not text_bad,
        "every doc scores its expected bytes": not bytes_bad,
    }
    if variant == "caseops":
        checks["caseops transform is lossless on every doc"] = not lossy
    row = {"variant": variant, "docs": int(starts.size), "tokens": int(tokens.size), "raw_bytes": raw,
           "scored_bytes": scored, "expected_bytes": expected_total,
           "bytes_per_target": scored / max(tokens.size - 1, 1), "text_mismatch_docs": len(text_bad),
           "byte_mismatch_docs": len(bytes_bad), "lossy_docs": len(lossy),
           "not_invertible_after_nfkc_docs": len(not_invertible), "ok": all(checks.values())}
    print(f"verify {data_dir}: variant {variant}, byte source {man['byte_source']}, tokenizer "
          f"{man['tokenizer']['file']} ({man['tokenizer']['sha256'][:12]})", file=out)
    print("| docs | tokens | raw bytes | scored bytes | expected bytes | bytes/target | mismatching docs |", file=out)
    print("|---:|---:|---:|---:|---:|---:|---:|", file=out)
    print(f"| {row['docs']:,} | {row['tokens']:,} | {raw:,} | {scored:,} | {expected_total:,} | "
          f"{row['bytes_per_target']:.4f} | {len(set(text_bad) | {b[0] for b in bytes_bad} | set(lossy))} |", file=out)
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}", file=out)
    if variant == "caseops":
        print(f"  [info] {len(not_invertible)} docs where caseops_decode(decoded) != normalize(source) "
              f"(NFKC after the transform; first: {not_invertible[:5]})", file=out)
    for k in text_bad[:5]:
        print(f"  text mismatch: val doc {k}", file=out)
    for k, got, want in bytes_bad[:5]:
        print(f"  byte mismatch: val doc {k} scores {got} bytes, expected {want}", file=out)
    print("PASS" if row["ok"] else "FAIL", file=out)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="prepare.py verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--docs", nargs="+", required=True, help="the source documents, val first")
    ap.add_argument("--val-docs", type=int, default=None, help="default: the manifest's val doc count")
    ap.add_argument("--json", default=None, help="also write the result row to this file")
    a = ap.parse_args(argv)
    try:
        row = verify(a.data_dir, a.docs, a.val_docs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
