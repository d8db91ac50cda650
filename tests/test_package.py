import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import pack
import package
import seeds
from logutil import final, write_log

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a fresh copy of a record folder needs to rebuild its data (data/download.py, prepare.py).
DATA_PIPELINE = ["requirements.txt", "lossless_caps.py", "data/__init__.py", "data/common.py",
                 "data/prepare.py", "data/download.py", "data/verify.py", "data/README.md"]
TOY = '''\
"""Toy stand-in for train_gpt.py: only --help matters here (and DataError, which data/ imports)."""
import os
import sys

import numpy as np
import torch


class DataError(ValueError):
    pass


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
    """A fake repo: readable source, its packed form, one log per seed, and the real data
    pipeline (data/*.py, lossless_caps.py, requirements.txt)."""
    (tmp_path / "train_gpt.py").write_text(TOY)
    for rel in DATA_PIPELINE:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copyfile(os.path.join(REPO_ROOT, rel), tmp_path / rel)
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


def run_package(repo, logs, *extra, blurb="Toy technique: nothing new"):
    root = repo["root"]
    return package.main(["--name", "toy", "--date", "2026-05-01", "--logs", *logs,
                         "--source", str(root / "train_gpt.py"), "--blurb", blurb,
                         "--packed", str(root / "out" / "train_gpt.py"), *extra])


def folder(repo):
    return repo["root"] / "records" / "track_10min_16mb" / "2026-05-01_toy"


def test_builds_record_folder(repo, capsys):
    assert run_package(repo, repo["make"](), "--dry-run-cmd") == 0
    out = capsys.readouterr()
    assert ("dry run: python train_gpt.py --help, python data/prepare.py --help, "
            "python data/download.py --help exited 0") in out.out
    assert "NON-RECORD" not in out.err
    f = folder(repo)
    names = sorted(str(p.relative_to(f)) for p in f.rglob("*") if p.is_file())
    assert names == sorted(["README.md", "submission.json", "train_gpt.py", "train_gpt_source.py",
                            "train_seed0.log", "train_seed1234.log", "train_seed42.log",
                            *DATA_PIPELINE])
    assert (f / "train_gpt.py").read_bytes() == (repo["root"] / "out" / "train_gpt.py").read_bytes()
    assert (f / "train_gpt_source.py").read_text() == TOY
    with open(os.path.join(REPO_ROOT, "data", "common.py"), "rb") as g:
        assert (f / "data" / "common.py").read_bytes() == g.read()
    sub = json.loads((f / "submission.json").read_text())
    assert sub["val_loss"] == pytest.approx(2.81) and sub["val_loss_std"] == pytest.approx(0.01)
    assert sub["bytes_code"] == repo["packed_size"] and sub["record"] is True
    assert sub["non_record_reasons"] == [] and sub["config_hash"] == "cfg123"
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3"
    readme = (f / "README.md").read_text()
    assert "NON-RECORD" not in readme and "| 1234 |" in readme and repo["sha"] in readme
    assert "Toy technique: nothing new" in readme
    # The shipped pair re-verifies with pack --check, as the README says.
    assert pack.check(str(f / "train_gpt_source.py"), str(f / "train_gpt.py"), "train_gpt.py") == []


def test_submission_json_has_the_upstream_schema(repo):
    assert run_package(repo, repo["make"]()) == 0
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert sub["track"] == "10min_16mb" and sub["seeds"] == [42, 0, 1234]
    assert sorted(sub["seed_results"]) == ["0", "1234", "42"]
    assert sub["seed_results"]["1234"]["val_loss"] == pytest.approx(2.82)
    assert sub["seed_results"]["42"]["artifact_bytes"] == 15_000_000 + repo["packed_size"]
    assert sub["pytorch_version"] == "2.9.1+cu128"
    assert sub["technique_summary"] == "Toy technique: nothing new"
    assert sub["compliance"] == {"artifact_under_16mb": True, "train_under_600s": True,
                                 "eval_under_600s": True, "eight_gpus": True,
                                 "legality_compliant": True, "record_eligible": True,
                                 "three_seeds": True}
    assert sub["env_overrides"] == {} and sub["data"]["variant"] == "caseops"


def test_edited_logs_are_stamped_non_record(repo, capsys):
    # The case: 1,500 s of training, 900 s of eval, one GPU, two seeds, and logs that
    # still claim record_eligible. Packaged, but NON-RECORD everywhere, with every reason.
    logs = repo["make"](seeds=(42, 0), train_time_s=1500.0, eval_strict_s=900.0, world_size=1)
    assert run_package(repo, logs) == 0
    assert "NON-RECORD" in capsys.readouterr().err
    sub = json.loads((folder(repo) / "submission.json").read_text())
    reasons = "\n".join(sub["non_record_reasons"])
    assert sub["record"] is False
    for why in ("train_time_s=1500 over the 600 limit", "eval_strict_s=900 over the 600 limit",
                "world_size=1", "2 distinct seed(s)"):
        assert why in reasons, why
    assert sub["compliance"]["train_under_600s"] is False and sub["compliance"]["eval_under_600s"] is False
    assert sub["compliance"]["eight_gpus"] is False and sub["compliance"]["three_seeds"] is False
    readme = (folder(repo) / "README.md").read_text()
    assert "**NON-RECORD**" in readme and "train_time_s=1500" in readme
    assert "nproc_per_node=1" in readme  # the command states the world size that ran


def test_log_without_record_eligible_is_non_record(repo):
    logs = repo["make"]()
    rec = seeds.read_final(logs[0])
    del rec["record_eligible"], rec["_path"]
    write_log(repo["root"] / "logs" / "r_seed42.txt", rec)
    assert run_package(repo, logs) == 0
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert any("log predates record_eligible" in r for r in sub["non_record_reasons"])


def test_refuses_mixed_world_size_unless_asked(repo, capsys):
    logs = repo["make"]() + repo["make"](seeds=(7,), world_size=4)
    assert run_package(repo, logs) == 2
    assert "world_size differs" in capsys.readouterr().err and not folder(repo).exists()
    assert run_package(repo, logs, "--allow-mixed", "world_size") == 0
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert "pooled runs of different world_size (--allow-mixed)" in sub["non_record_reasons"]


def test_reproduce_has_data_step_and_every_override(repo):
    env = {"TTT_ENABLED": "0", "DATA_PATH": "/data/my caseops", "TOKENIZER_PATH": "./data/tokenizers/tok.model"}
    (repo["root"] / "data" / "tokenizers").mkdir()
    (repo["root"] / "data" / "tokenizers" / "tok.model").write_bytes(b"fake tokenizer")
    logs = [write_log(repo["root"] / "logs" / f"r_seed{s}.txt", final(
        s, 2.8, source_sha256=repo["sha"], code_bytes=repo["packed_size"], model_bytes=15_000_000,
        artifact_bytes=15_000_000 + repo["packed_size"],
        env_overrides={**env, "SEED": str(s), "RUN_ID": f"x{s}", "ARTIFACT_DIR": f"artifacts/x{s}"}))
        for s in (42, 0, 1234)]
    assert run_package(repo, logs) == 0
    f = folder(repo)
    readme = (f / "README.md").read_text()
    assert ("python data/download.py --variant caseops --train-shards 80 --out '/data/my caseops' "
            "--tokenizer-dir ./data/tokenizers") in readme
    assert "for SEED in 42 0 1234; do" in readme
    assert ("DATA_PATH='/data/my caseops' TOKENIZER_PATH=./data/tokenizers/tok.model TTT_ENABLED=0 "
            "SEED=$SEED RUN_ID=toy_seed$SEED ARTIFACT_DIR=artifacts/toy_seed$SEED") in readme
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert (f / "data" / "tokenizers" / "tok.model").read_bytes() == b"fake tokenizer"
    sub = json.loads((f / "submission.json").read_text())
    assert sub["env_overrides"] == env and sub["record"] is True


def test_refuses_seeds_with_different_overrides(repo, capsys):
    logs = repo["make"]() + repo["make"](seeds=(7,), env_overrides={"SEED": "7", "MATRIX_LR": "0.03"})
    assert run_package(repo, logs) == 2
    assert "different env overrides besides SEED/RUN_ID/ARTIFACT_DIR" in capsys.readouterr().err
    assert run_package(repo, logs, "--allow-mixed", "env_overrides") == 0
    readme = (folder(repo) / "README.md").read_text()
    assert "MATRIX_LR=0.03 SEED=7 RUN_ID=toy_seed7 torchrun" in readme  # one line per seed
    assert "SEED=42 RUN_ID=toy_seed42 torchrun" in readme
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert "seeds ran with different env overrides (--allow-mixed env_overrides)" in sub["non_record_reasons"]


def test_log_without_env_overrides_is_non_record(repo):
    logs = repo["make"]()
    rec = seeds.read_final(logs[1])
    del rec["env_overrides"], rec["_path"]
    write_log(repo["root"] / "logs" / "r_seed0.txt", rec)
    assert run_package(repo, logs) == 0
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert any("lacks env_overrides" in r for r in sub["non_record_reasons"])


def test_empty_blurb_warns(repo, capsys):
    assert run_package(repo, repo["make"](), blurb="") == 0
    assert "WARNING: --blurb is empty" in capsys.readouterr().err


def test_missing_data_pipeline_is_non_record(repo, capsys):
    os.remove(repo["root"] / "data" / "common.py")
    assert run_package(repo, repo["make"]()) == 0
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert any("data/common.py not found" in r for r in sub["non_record_reasons"])


def test_real_record_folder_runs_from_a_fresh_copy(tmp_path):
    """The folder built from this repo's train_gpt.py and data pipeline starts every entry
    point from a copy of itself elsewhere (no repo on the path)."""
    source = os.path.join(REPO_ROOT, "train_gpt.py")
    packed = pack.pack_bytes(pack.read_source(source), "train_gpt.py")
    sha = hashlib.sha256(pack.read_source(source)).hexdigest()
    (tmp_path / "logs").mkdir()
    logs = [write_log(tmp_path / "logs" / f"s{s}.txt", final(
        s, 2.8, source_sha256=sha, code_bytes=len(packed), model_bytes=15_000_000,
        artifact_bytes=15_000_000 + len(packed))) for s in (42, 0, 1234)]
    (tmp_path / "train_gpt.py").write_bytes(packed)
    assert package.main(["--name", "real", "--date", "2026-05-01", "--logs", *logs, "--source", source,
                         "--packed", str(tmp_path / "train_gpt.py"), "--repo-root", REPO_ROOT,
                         "--out-root", str(tmp_path / "records"), "--blurb", "b"]) == 0
    fresh = tmp_path / "fresh"
    shutil.copytree(tmp_path / "records" / "2026-05-01_real", fresh)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("data/prepare.py", "data/download.py", "train_gpt.py"):
        r = subprocess.run([sys.executable, script, "--help"], cwd=fresh, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (script, r.stdout[-1000:], r.stderr[-2000:])
    readme = (fresh / "README.md").read_text()
    assert ("python data/download.py --variant caseops --train-shards 80 --out "
            "./data/datasets/fineweb10B_sp8192_caseops --tokenizer-dir ./data/tokenizers") in readme


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
    logs = repo["make"](mode="smoke", record_eligible=False, not_record_because=["SMOKE=1"])
    assert run_package(repo, logs) == 0
    assert "NON-RECORD" in capsys.readouterr().err
    sub = json.loads((folder(repo) / "submission.json").read_text())
    assert sub["record"] is False and sub["mode"] == "smoke"
    assert any(r.endswith(": SMOKE=1") for r in sub["non_record_reasons"])
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


def test_tools_readme_names_only_real_flags():
    """Every --flag tools/README.md documents is declared by the tool (or data/download.py) it
    describes, so the README cannot silently go stale when a flag is renamed."""
    import re

    with open(os.path.join(REPO_ROOT, "tools", "README.md")) as f:
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z_-]*)", f.read())) - {"--help"}
    src = ""
    for rel in ("tools/pack.py", "tools/seeds.py", "tools/package.py", "tools/legality.py", "data/download.py"):
        with open(os.path.join(REPO_ROOT, rel)) as f:
            src += f.read()
    missing = sorted(x for x in flags if f'"{x}"' not in src and f"{x}=" not in src)
    assert not missing, missing
