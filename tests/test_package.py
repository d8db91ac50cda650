import hashlib
import json

import pytest

import pack
import package
from logutil import final, write_log

TOY = '''\
"""Toy stand-in for train_gpt.py: only --help matters here."""
import os
import sys

import numpy as np
import torch


def main():
    if "--help" in sys.argv:
        print("config: SEED=1337 (file %s)" % os.path.basename(__file__))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
'''


@pytest.fixture
def repo(tmp_path):
    """A fake repo: readable source, its packed form, one log per seed, requirements.txt."""
    (tmp_path / "train_gpt.py").write_text(TOY)
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\n")
    packed = pack.pack_bytes(TOY.encode(), "train_gpt.py")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_gpt.py").write_bytes(packed)
    (tmp_path / "logs").mkdir()
    sha = hashlib.sha256(TOY.encode()).hexdigest()
    repo = {"root": tmp_path, "packed_size": len(packed), "sha": sha, "logs": []}
    repo["make"] = lambda **over: make_logs(repo, **over)
    return repo


def make_logs(repo, seeds=(42, 0, 1234), **over):
    logs = []
    for i, seed in enumerate(seeds):
        fields = {"source_sha256": repo["sha"], "code_bytes": repo["packed_size"],
                  "model_bytes": 15_000_000, "artifact_bytes": 15_000_000 + repo["packed_size"]}
        fields.update(over)
        path = repo["root"] / "logs" / f"r_seed{seed}.txt"
        logs.append(write_log(path, final(seed, 2.80 + 0.01 * i, **fields), device="8xH100 80GB SXM"))
    return logs


def run_package(repo, logs, *extra):
    root = repo["root"]
    return package.main(["--name", "toy", "--date", "2026-05-01", "--logs", *logs,
                         "--source", str(root / "train_gpt.py"),
                         "--packed", str(root / "out" / "train_gpt.py"), *extra])


def folder(repo):
    return repo["root"] / "records" / "track_10min_16mb" / "2026-05-01_toy"


def test_builds_record_folder(repo, capsys):
    assert run_package(repo, repo["make"](), "--dry-run-cmd") == 0
    out = capsys.readouterr()
    assert "dry run: python train_gpt.py --help exited 0" in out.out
    assert "lossless_caps.py not found" in out.out and "NON-RECORD" not in out.err
    f = folder(repo)
    names = sorted(p.name for p in f.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_gpt_source.py", "train_seed0.log", "train_seed1234.log", "train_seed42.log"]
    assert (f / "train_gpt.py").read_bytes() == (repo["root"] / "out" / "train_gpt.py").read_bytes()
    assert (f / "train_gpt_source.py").read_text() == TOY
    sub = json.loads((f / "submission.json").read_text())
    assert sub["val_loss"] == pytest.approx(2.81) and sub["val_loss_std"] == pytest.approx(0.01)
    assert sub["bytes_code"] == repo["packed_size"] and sub["non_record"] is False
    assert sub["hardware"] == "8xH100 80GB SXM" and sub["config_hash"] == "cfg123"
    assert [s["seed"] for s in sub["seeds"]] == [42, 0, 1234]
    readme = (f / "README.md").read_text()
    assert "NON-RECORD" not in readme and "| 1234 |" in readme and repo["sha"] in readme
    assert "for SEED in 42 0 1234; do SEED=$SEED torchrun" in readme
    # The shipped pair re-verifies with pack --check, as the README says.
    assert pack.check(str(f / "train_gpt_source.py"), str(f / "train_gpt.py"), "train_gpt.py") == []


def test_packs_when_packed_omitted(repo):
    logs = repo["make"]()
    root = repo["root"]
    assert package.main(["--name", "toy", "--date", "2026-05-01", "--logs", *logs,
                         "--source", str(root / "train_gpt.py")]) == 0
    assert (folder(repo) / "train_gpt.py").stat().st_size == repo["packed_size"]


@pytest.mark.parametrize("over, message", [
    ({"code_bytes": 123}, "code_bytes=123"),
    ({"source_sha256": "f" * 64}, "source_sha256 differs"),
    ({"artifact_bytes": 16_000_001, "model_bytes": None}, "over the 16,000,000 cap"),
    ({"artifact_bytes": 15_000_000}, "artifact_bytes != code_bytes + model_bytes"),
])
def test_refuses_bad_logs(repo, capsys, over, message):
    assert run_package(repo, repo["make"](**over)) == 2
    assert message in capsys.readouterr().err
    assert not folder(repo).exists()


def test_refuses_mixed_config(repo, capsys):
    logs = repo["make"]() + repo["make"](seeds=(7,), config_hash="other")
    assert run_package(repo, logs) == 2
    assert "config_hash differs" in capsys.readouterr().err


def test_refuses_duplicate_seed_and_existing_folder(repo, capsys):
    logs = repo["make"]()
    assert run_package(repo, logs + logs[:1]) == 2
    assert "distinct" in capsys.readouterr().err
    assert run_package(repo, logs) == 0
    assert run_package(repo, logs) == 2
    assert "--force" in capsys.readouterr().err
    assert run_package(repo, logs, "--force") == 0


def test_refuses_packed_file_of_other_source(repo, capsys):
    other = pack.pack_bytes(b"print('hi')\n", "train_gpt.py")
    (repo["root"] / "out" / "train_gpt.py").write_bytes(other)
    assert run_package(repo, repo["make"](code_bytes=len(other))) == 2
    assert "embedded source differs" in capsys.readouterr().err


def test_non_record_is_stamped_not_refused(repo, capsys):
    logs = repo["make"](mode="smoke")
    assert run_package(repo, logs) == 0
    assert "NON-RECORD" in capsys.readouterr().err
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert sub["non_record"] is True and sub["mode"] == "smoke"
    assert "NON-RECORD" in (folder(repo) / "README.md").read_text()


def install_source(repo, text: str):
    """Replace the repo's readable and packed train_gpt.py with `text`."""
    (repo["root"] / "train_gpt.py").write_text(text)
    packed = pack.pack_bytes(text.encode(), "train_gpt.py")
    (repo["root"] / "out" / "train_gpt.py").write_bytes(packed)
    repo.update(sha=hashlib.sha256(text.encode()).hexdigest(), packed_size=len(packed))


def test_dry_run_failure_exits_2(repo, capsys):
    install_source(repo, TOY.replace("return 0", "return 5"))
    assert run_package(repo, repo["make"](), "--dry-run-cmd") == 2
    assert "exited 5" in capsys.readouterr().err


def test_check_imports_flags_violations(tmp_path):
    src = tmp_path / "s.py"
    src.write_text(
        "import os, json\nimport torch.nn as nn\nfrom numpy import array\nimport flash_attn_interface\n"
        "import zstandard\nfrom . import helper\nfrom mylib.sub import thing\n"
        "exec(open('helper.py').read())\n"
        "mod = __import__('pandas')\nimport importlib\nimportlib.import_module(name)\n"
        "import runpy\nrunpy.run_path('x.py')\n"
        "text = open(__file__).read()\n")  # reading its own source for hashing is fine
    problems = package.check_imports(str(src))
    got = {int(p.split(":")[1]) for p in problems}
    assert got == {5, 6, 7, 8, 9, 11, 13}, problems
    assert any("'zstandard'" in p for p in problems)
    # Allow-listing modules leaves the relative import, file exec and dynamic import flagged.
    rest = package.check_imports(str(src), ["zstandard", "mylib", "pandas"])
    assert {int(p.split(":")[1]) for p in rest} == {6, 8, 11, 13}, rest


def test_check_imports_rejected_at_package_time(repo, capsys):
    install_source(repo, TOY.replace("import torch\n", "import torch\nimport my_helpers\n"))
    assert run_package(repo, repo["make"]()) == 2
    assert "my_helpers" in capsys.readouterr().err
