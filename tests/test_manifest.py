"""train_gpt.load_data_spec / load_val_data refuse every mismatch between data and manifest."""

import json
import os
import shutil

import numpy as np
import pytest

import train_gpt
from data import common


@pytest.fixture
def data(smoke_dir, tmp_path):
    d = str(tmp_path / "ds")
    shutil.copytree(smoke_dir, d)
    env = {"DATA_PATH": d, "TOKENIZER_PATH": os.path.join(d, "smoke_caseops_1024.model"), "VOCAB_SIZE": "1024"}
    return d, env


def load(env):
    h = train_gpt.load_config(env)
    return train_gpt.load_val_data(train_gpt.load_data_spec(h), h)


def test_consistent_data_loads(data):
    d, env = data
    vd = load(env)
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert vd.tokens.numel() == man["val"]["tokens"]
    assert int(vd.target_bytes.sum()) == man["val"]["scored_bytes"]


def test_refuses_missing_manifest(data):
    d, env = data
    os.remove(os.path.join(d, "manifest.json"))
    with pytest.raises(train_gpt.DataError, match="DATA_PATH=.*manifest.json"):
        load(env)


def test_refuses_other_tokenizer(data, tmp_path):
    d, env = data
    other = str(tmp_path / "other.model")
    with open(env["TOKENIZER_PATH"], "rb") as f, open(other, "wb") as g:
        g.write(f.read() + b"\0")
    with pytest.raises(train_gpt.DataError, match="TOKENIZER_PATH=.*sha256"):
        load({**env, "TOKENIZER_PATH": other})
    with pytest.raises(train_gpt.DataError, match="TOKENIZER_PATH=.*not found"):
        load({**env, "TOKENIZER_PATH": str(tmp_path / "missing.model")})


def test_refuses_vocab_mismatch(data):
    d, env = data
    with pytest.raises(train_gpt.DataError, match="VOCAB_SIZE=2048"):
        load({**env, "VOCAB_SIZE": "2048"})


def test_refuses_missing_sidecar(data):
    d, env = data
    os.remove(os.path.join(d, "fineweb_val_bytes_000000.bin"))
    with pytest.raises(train_gpt.DataError, match="fineweb_val_bytes_000000.bin"):
        load(env)


def rewrite_sidecar(d: str, change):
    path = os.path.join(d, "fineweb_val_bytes_000000.bin")
    common.write_shard(path, change(np.array(train_gpt.read_shard(path))))


def test_refuses_sidecar_of_wrong_length(data):
    d, env = data
    rewrite_sidecar(d, lambda side: side[:-1])
    with pytest.raises(train_gpt.DataError, match="byte sidecar .* has"):
        load(env)


def test_refuses_val_shards_not_in_manifest(data):
    d, env = data
    shutil.copyfile(os.path.join(d, "fineweb_val_000000.bin"), os.path.join(d, "fineweb_val_000001.bin"))
    with pytest.raises(train_gpt.DataError, match="differ from manifest"):
        load(env)


def test_bytes_files_never_returned_as_tokens(data):
    d, env = data
    assert [os.path.basename(p) for p in train_gpt.token_shards(d, "val")] == ["fineweb_val_000000.bin"]
    assert all("_bytes_" not in os.path.basename(p) for p in train_gpt.token_shards(d, "train"))


def test_refuses_corrupt_shard(data):
    d, env = data
    with open(os.path.join(d, "fineweb_val_000000.bin"), "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(train_gpt.DataError, match="size does not match"):
        load(env)


# Two former gaps of train_gpt.py, fixed: a sidecar with the right length but wrong values, and a
# train document split across shard boundaries that repeats a val document.


def test_scorer_refuses_sidecar_with_wrong_values(data):
    d, env = data
    rewrite_sidecar(d, lambda side: side + (np.arange(side.size) == 5))
    with pytest.raises(train_gpt.DataError):
        load(env)


def test_scorer_disjoint_check_sees_docs_across_shards(data):
    d, env = data
    for name in os.listdir(d):  # val doc [5 6 7]; train doc [5 6 7] split over two shards
        if name.startswith("fineweb_train_"):
            os.remove(os.path.join(d, name))
    common.write_shard(os.path.join(d, "fineweb_train_000000.bin"), np.array([1, 9, 1, 5], np.uint16))
    common.write_shard(os.path.join(d, "fineweb_train_000001.bin"), np.array([6, 7, 1, 9], np.uint16))
    val = np.array(train_gpt.read_shard(os.path.join(d, "fineweb_val_000000.bin")))
    val[:5] = [1, 5, 6, 7, 1]
    common.write_shard(os.path.join(d, "fineweb_val_000000.bin"), val)
    h = train_gpt.load_config(env)
    with pytest.raises(train_gpt.DataError, match="overlap|also appear"):
        spec = train_gpt.load_data_spec(h)
        train_gpt.assert_disjoint(spec.val_files, spec.train_files, spec.bos_id)
