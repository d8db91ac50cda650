"""prepare.py end to end: all three variants on a tiny corpus, the verify proof, disjointness."""

import json
import lzma
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import zstandard

import train_gpt
from conftest import CASEOPS8192, REPO_ROOT, SP8192, need
from data import common, prepare, verify

HAND_DOCS = [
    "The NASA Launch iPhone OpenAI  double  space\nnewline", "  leading and trailing  ", "\n\nnewlines\n\n",
    "", " ", "\u200b", "\x00 \x01abc\x02 \x03", "abc\x02", "abc \x02", "\ufeffBOM", "\xa0nbsp\xa0",
    "ﬁne ½ ™ Ⅳ ＡＢＣ", "E\u0301cole CAFE\u0301 Ünïcode", "literal \ue001\ue002\ue003\ue004 \ue004\ue001X",
    "\ue001 at start", "under\u2581score \u2581", "emoji 😀👍🏽 漢字", "CRLF\r\nline\r\n", "many" + " " * 80 + "spaces",
    "I A NASA McDonald's HTTPServer x86_64", "ΟΔΟΣ İstanbul straße", "\x7f\x1b\x0b\x0c\x85\u2028 ctl",
    "soft\u00adhyphen zwj\u200dx", "¨ diaeresis", "x" * 2000,
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """val: hand-made edge cases + random strings; train: Python doc paragraphs (xz and zst)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    alphabet = "aAbBzZ \n\t\u200b\x00\x01ÉéﬁÜ½\ue001\ue004.,!1"
    val = HAND_DOCS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(60)]
    train = prepare.smoke_docs()[:900]
    with open(d / "val.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in val)
    blob = "".join(json.dumps({"text": t}) + "\n" for t in train).encode()
    with lzma.open(d / "train.jsonl.xz", "wb") as f:
        f.write(blob)
    (d / "train.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    return {"val": str(d / "val.jsonl"), "xz": str(d / "train.jsonl.xz"), "zst": str(d / "train.jsonl.zst"),
            "n_val": len(val), "n_train": len(train)}


def build(corpus, out, variant, **kw):
    kw.setdefault("train_tokenizer", "tokenizer_model" not in kw)
    kw.setdefault("vocab_size", 600)
    return prepare.build([corpus["val"], corpus["xz"]], variant, str(out), val_docs=corpus["n_val"],
                         workers=kw.pop("workers", 2), **kw)


@pytest.mark.parametrize("variant", ["sp", "caseops", "casefold"])
def test_build_and_verify_all_variants(corpus, tmp_path, variant):
    man = build(corpus, tmp_path / variant, variant, shard_tokens=20_000)
    assert man["variant"] == variant and man["val"]["docs"] == corpus["n_val"]
    assert man["train"]["docs"] == corpus["n_train"] and len(man["train"]["shards"]) > 1
    assert man["byte_source"] == ("lut" if variant == "sp" else "sidecar")
    assert [s["tokens"] for s in man["val"]["byte_shards"]] == ([] if variant == "sp" else
                                                                [s["tokens"] for s in man["val"]["shards"]])
    tokens = common.concat_shards([str(tmp_path / variant / s["name"]) for s in man["val"]["shards"]])
    assert tokens[0] == 1 and (tokens == 1).sum() == corpus["n_val"]  # BOS per doc, no EOS
    row = verify.verify(str(tmp_path / variant), [corpus["val"]])
    assert row["ok"], row
    if variant != "sp":  # sidecar = raw bytes minus what SentencePiece strips at the doc edges
        assert 0 < row["raw_bytes"] - row["scored_bytes"] < 200


def test_real_tokenizers_verify(corpus, tmp_path):
    man = build(corpus, tmp_path / "c", "caseops", tokenizer_model=need(CASEOPS8192))
    assert man["tokenizer"]["vocab_size"] == 8192
    assert verify.verify(str(tmp_path / "c"), [corpus["val"]])["ok"]
    build(corpus, tmp_path / "s", "sp", tokenizer_model=need(SP8192))
    assert verify.verify(str(tmp_path / "s"), [corpus["val"]])["ok"]


def test_verify_fails_on_tampered_sidecar(corpus, tmp_path):
    out = tmp_path / "c"
    build(corpus, out, "caseops")
    path = str(out / "fineweb_val_bytes_000000.bin")
    side = np.array(train_gpt.read_shard(path))
    k = int(np.flatnonzero(side > 0)[5])
    side[k] += 1  # one byte too many: manifest total and per-doc check both disagree
    common.write_shard(path, side)
    assert not verify.verify(str(out), [corpus["val"]])["ok"]
    j = int(np.flatnonzero(side > 1)[-1])
    side[j] -= 1  # now the total is right again, but two documents are wrong
    common.write_shard(path, side)
    row = verify.verify(str(out), [corpus["val"]])
    assert not row["ok"] and row["byte_mismatch_docs"] == 2
    res = subprocess.run([sys.executable, "data/prepare.py", "verify", str(out), "--docs", corpus["val"]],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "FAIL" in res.stdout


def test_verify_fails_on_wrong_source_docs(corpus, tmp_path):
    out = tmp_path / "c"
    build(corpus, out, "casefold")
    other = tmp_path / "other.jsonl"
    lines = open(corpus["val"]).readlines()
    lines[3] = json.dumps({"text": "a different document"}) + "\n"
    other.write_text("".join(lines))
    row = verify.verify(str(out), [str(other)])
    assert not row["ok"] and row["text_mismatch_docs"] == 1


def test_idempotent_and_worker_independent(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(corpus, a, "caseops", workers=1, shard_tokens=15_000)
    build(corpus, b, "caseops", workers=2, shard_tokens=15_000)
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b))
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    mtimes = {n: os.path.getmtime(a / n) for n in files}
    build(corpus, a, "caseops", workers=2, shard_tokens=15_000)  # same inputs: skipped
    assert mtimes == {n: os.path.getmtime(a / n) for n in files}
    before = {n: (a / n).read_bytes() for n in files}
    build(corpus, a, "caseops", workers=2, shard_tokens=15_000, force=True)
    assert before == {n: (a / n).read_bytes() for n in files}


def test_zst_input_and_max_train_tokens(corpus, tmp_path):
    man = prepare.build([corpus["val"], corpus["zst"]], "sp", str(tmp_path / "z"), train_tokenizer=True,
                        vocab_size=600, val_docs=corpus["n_val"], max_train_tokens=5000, workers=2)
    assert 5000 <= man["train"]["tokens"] < 5000 + 2000
    tokens = common.concat_shards([str(tmp_path / "z" / s["name"]) for s in man["train"]["shards"]])
    assert (tokens == 1).sum() == man["train"]["docs"] < corpus["n_train"]


def test_refuses_too_few_docs(corpus, tmp_path, caseops_model):
    with pytest.raises(common.DataError, match="fewer than --val-docs"):
        prepare.build([corpus["val"]], "sp", str(tmp_path / "x"), tokenizer_model=caseops_model, val_docs=10_000)
    with pytest.raises(common.DataError, match="no train documents"):
        prepare.build([corpus["val"]], "sp", str(tmp_path / "x"), tokenizer_model=caseops_model,
                      val_docs=corpus["n_val"])
    with pytest.raises(common.DataError, match="no train documents to train the tokenizer"):
        prepare.build([corpus["val"]], "sp", str(tmp_path / "x"), train_tokenizer=True, val_docs=corpus["n_val"])


def test_build_refuses_train_val_overlap(corpus, tmp_path):
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"text": HAND_DOCS[0]}) + "\n")
    with pytest.raises(common.DataError, match="overlap"):
        prepare.build([corpus["val"], corpus["xz"], str(leak)], "caseops", str(tmp_path / "o"),
                      train_tokenizer=True, vocab_size=600, val_docs=corpus["n_val"], workers=1)
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_check_disjoint_across_shard_boundaries(tmp_path):
    def shard(name, values):
        common.write_shard(str(tmp_path / name), np.array(values, dtype=np.uint16))
        return str(tmp_path / name)

    val = [shard("v.bin", [1, 5, 6, 7, 1, 1, 8])]  # docs [5 6 7], [] (empty), [8]
    # train doc [5 6 7] straddles the two train shards; empty docs never count as overlap
    train = [shard("t0.bin", [1, 9, 9, 1, 1, 5]), shard("t1.bin", [6, 7, 1, 9])]
    with pytest.raises(common.DataError, match="overlap"):
        common.check_disjoint(val, train)
    train = [shard("t0.bin", [1, 9, 9, 1, 1, 5]), shard("t1.bin", [6, 7, 4, 1, 9])]  # [5 6 7 4] differs
    assert common.check_disjoint(val, train) == 2


def test_smoke_dataset(smoke_dir):
    man = json.load(open(os.path.join(smoke_dir, "manifest.json")))
    preset = train_gpt.SMOKE_PRESET
    assert os.path.isfile(os.path.join(smoke_dir, "smoke_caseops_1024.model"))
    assert man["tokenizer"]["vocab_size"] == preset["vocab_size"] == 1024
    assert man["variant"] == "caseops" and man["val"]["docs"] >= 300 and man["val"]["tokens"] >= 20_000
    assert all(s["tokens"] > 2 * (preset["train_batch_tokens"] + 1) for s in man["train"]["shards"])
    env = {"SMOKE": "1", "DATA_PATH": smoke_dir, "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model")}
    h = train_gpt.load_config(env)
    assert int(train_gpt.load_val_data(train_gpt.load_data_spec(h), h).target_bytes.sum()) == man["val"]["scored_bytes"]
    row = verify.verify(smoke_dir, [os.path.join(smoke_dir, "smoke_docs.jsonl")])
    assert row["ok"]


def test_smoke_is_deterministic(smoke_dir, tmp_path):
    out = str(tmp_path / "again")
    prepare.smoke(out=out, workers=1)
    for name in os.listdir(smoke_dir):
        if name != "manifest.json":
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(smoke_dir, name), "rb").read()
    a, b = (json.load(open(os.path.join(p, "manifest.json"))) for p in (out, smoke_dir))
    assert a == b
