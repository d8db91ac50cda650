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


def resign(d: str, name: str, entry: dict):
    """Record a rewritten shard in manifest.json, as a rebuild would: the deeper checks of
    load_val_data are then the ones that must catch it."""
    mpath = os.path.join(d, "manifest.json")
    man = json.load(open(mpath))
    for group in (man["val"]["shards"], man["val"]["byte_shards"], man["train"]["shards"]):
        for i, s in enumerate(group):
            if s["name"] == name:
                group[i] = entry
    common.write_manifest(mpath, man)


def rewrite_sidecar(d: str, change):
    path = os.path.join(d, "fineweb_val_bytes_000000.bin")
    resign(d, os.path.basename(path), common.write_shard(path, change(np.array(train_gpt.read_shard(path)))))


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


def test_disjoint_command_sees_docs_across_shards(data):
    """The disjointness check is data prep (data/common.py, `prepare.py disjoint DIR`), no longer
    trainer code run on rank 0 while the other ranks wait in a collective."""
    from data import prepare

    d, env = data
    assert prepare.main(["disjoint", d]) == 0
    man = json.load(open(os.path.join(d, "manifest.json")))
    for s in man["train"]["shards"]:  # val doc [5 6 7]; train doc [5 6 7] split over two shards
        os.remove(os.path.join(d, s["name"]))
    man["train"]["shards"] = [common.write_shard(os.path.join(d, f"fineweb_train_00000{i}.bin"), np.array(t, np.uint16))
                              for i, t in enumerate(([1, 9, 1, 5], [6, 7, 1, 9]))]
    common.write_manifest(os.path.join(d, "manifest.json"), man)
    val = np.array(train_gpt.read_shard(os.path.join(d, "fineweb_val_000000.bin")))
    val[:5] = [1, 5, 6, 7, 1]
    resign(d, "fineweb_val_000000.bin", common.write_shard(os.path.join(d, "fineweb_val_000000.bin"), val))
    assert prepare.main(["disjoint", d]) == 1
    with pytest.raises(common.DataError, match="overlap"):
        common.check_disjoint_dir(d)
    assert not hasattr(train_gpt, "assert_disjoint") and not hasattr(train_gpt, "doc_hashes")
    with pytest.raises(ValueError, match="CHECK_DISJOINT.*prepare.py disjoint"):
        train_gpt.load_config({**env, "CHECK_DISJOINT": "1"})


# Corrupted files in a copy of the smoke data (issue 13: a corrupted train header hung the run, a
# flipped val byte changed the score and stayed "compliant").


def corrupt(path: str, offset: int):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_refuses_corrupt_train_header_at_startup(data):
    d, env = data
    corrupt(os.path.join(d, "fineweb_train_000001.bin"), 0)  # the magic
    with pytest.raises(train_gpt.DataError, match="fineweb_train_000001.bin: not a shard"):
        train_gpt.load_data_spec(train_gpt.load_config(env))


def test_refuses_train_shard_that_differs_from_manifest(data):
    d, env = data
    path = os.path.join(d, "fineweb_train_000001.bin")
    common.write_shard(path, np.array(train_gpt.read_shard(path))[:-7])  # a valid, shorter shard
    with pytest.raises(train_gpt.DataError, match="fineweb_train_000001.bin: .* tokens, manifest.json says"):
        train_gpt.load_data_spec(train_gpt.load_config(env))


@pytest.mark.parametrize("name", ["fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"])
def test_refuses_flipped_val_byte(data, name):
    d, env = data
    corrupt(os.path.join(d, name), 1024 + 2 * 1000)  # one token / byte count, size and header intact
    with pytest.raises(train_gpt.DataError, match=f"{name}: sha256 differs from manifest.json"):
        train_gpt.load_data_spec(train_gpt.load_config(env))


def test_loader_thread_failure_stops_the_main_thread(data):
    """A shard that breaks while training (after the start-up checks) must raise in the main
    thread with the loader's message; before, the main thread waited on the queue forever. The
    calls run in a helper thread joined with a timeout, so a regression fails instead of hanging."""
    d, env = data
    bad = os.path.join(d, "fineweb_train_000001.bin")
    corrupt(bad, 0)
    dist_cpu = train_gpt.Dist(0, 1, 0, train_gpt.torch.device("cpu"))
    loader = train_gpt.TrainLoader(train_gpt.token_shards(d, "train"), 511, dist_cpu)
    out = {}

    def consume():
        try:
            for _ in range(1000):
                loader.next_step()
        except Exception as e:
            out["error"] = e

    t = train_gpt.threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "next_step is still waiting on the dead loader thread"
    assert isinstance(out.get("error"), RuntimeError) and "fineweb_train_000001.bin: not a shard" in str(out["error"])
