"""download.py against a local directory laid out like the hub repos (no network)."""

import json
import os
import shutil

import pytest

import train_gpt
from data import common, download

CASEOPS_DS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def fake_hub(root, smoke_dir, dataset, with_bytes=True):
    """The hub layout of spec 1.3, filled with the smoke shards and tokenizer."""
    ddir = os.path.join(root, "datasets", "datasets", dataset)
    os.makedirs(ddir)
    os.makedirs(os.path.join(root, "datasets", "tokenizers"))
    for name in os.listdir(smoke_dir):
        if name.startswith("fineweb_") and (with_bytes or "_bytes_" not in name):
            shutil.copyfile(os.path.join(smoke_dir, name), os.path.join(ddir, name))
    shutil.copyfile(os.path.join(smoke_dir, "smoke_caseops_1024.model"),
                    os.path.join(root, "datasets", "tokenizers", "tok.model"))
    man = json.load(open(os.path.join(smoke_dir, "manifest.json")))
    hub = {"num_val_docs": man["val"]["docs"],
           "datasets": [{"name": dataset, "tokenizer_name": "tok",
                         "stats": {"files_val": 1, "files_train": len(man["train"]["shards"]),
                                   "docs_val": man["val"]["docs"]}}],
           "tokenizers": [{"name": "tok", "model_path": "tokenizers/tok.model"}]}
    with open(os.path.join(root, "datasets", "manifest.json"), "w") as f:
        json.dump(hub, f)
    return man


def test_download_caseops_from_local_hub(smoke_dir, tmp_path):
    ref = fake_hub(str(tmp_path / "hub"), smoke_dir, CASEOPS_DS)
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    os.makedirs(out)
    open(os.path.join(out, "fineweb_train_000099.bin"), "wb").close()  # stale: must go
    man = download.download("caseops", out, train_shards=2, fetcher=download.LocalFetcher(str(tmp_path / "hub")),
                            tokenizer_dir=tok)
    assert not os.path.exists(os.path.join(out, "fineweb_train_000099.bin"))
    assert os.path.isfile(os.path.join(tok, "tok.model"))
    assert man["variant"] == "caseops" and man["byte_source"] == "sidecar" and man["disjoint_checked"]
    assert man["val"]["scored_bytes"] == ref["val"]["scored_bytes"]
    assert man["val"]["tokens"] == ref["val"]["tokens"] and man["train"]["docs"] == ref["train"]["docs"]
    env = {"DATA_PATH": out, "TOKENIZER_PATH": os.path.join(tok, "tok.model"), "VOCAB_SIZE": "1024"}
    h = train_gpt.load_config(env)
    spec = train_gpt.load_data_spec(h)
    assert len(spec.train_files) == 2 and spec.byte_source == "sidecar"


def test_download_sp8192_layout_uses_lut(smoke_dir, tmp_path):
    fake_hub(str(tmp_path / "hub"), smoke_dir, "fineweb10B_sp8192", with_bytes=False)
    man = download.download("sp8192", str(tmp_path / "out"), train_shards=1,
                            fetcher=download.LocalFetcher(str(tmp_path / "hub")), tokenizer_dir=str(tmp_path / "t"))
    assert man["byte_source"] == "lut" and man["val"]["byte_shards"] == [] and len(man["train"]["shards"]) == 1


def test_download_checks_hub_sha256(smoke_dir, tmp_path):
    fake_hub(str(tmp_path / "hub"), smoke_dir, CASEOPS_DS)
    rel = f"datasets/datasets/{CASEOPS_DS}/fineweb_val_000000.bin"
    good = train_gpt.sha256_file(os.path.join(tmp_path, "hub", rel))
    fetch = download.LocalFetcher(str(tmp_path / "hub"), sums={rel: good})
    download.download("caseops", str(tmp_path / "ok"), 1, fetch, str(tmp_path / "t"))
    fetch = download.LocalFetcher(str(tmp_path / "hub"), sums={rel: "0" * 64})
    with pytest.raises(common.DataError, match="differs from the hub"):
        download.download("caseops", str(tmp_path / "bad"), 1, fetch, str(tmp_path / "t"))


def test_download_errors(smoke_dir, tmp_path, monkeypatch):
    fake_hub(str(tmp_path / "hub"), smoke_dir, CASEOPS_DS)
    fetch = download.LocalFetcher(str(tmp_path / "hub"))
    with pytest.raises(common.DataError, match="has only 2"):
        download.download("caseops", str(tmp_path / "o"), 80, fetch, str(tmp_path / "t"))
    with pytest.raises(common.DataError, match="no dataset fineweb10B_sp8192 "):
        download.download("sp8192", str(tmp_path / "o"), 1, fetch, str(tmp_path / "t"))

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kw):
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    with pytest.raises(common.DataError, match="someone/mirror.*--from-local"):
        download.download("caseops", str(tmp_path / "o"), 1, None, str(tmp_path / "t"))
