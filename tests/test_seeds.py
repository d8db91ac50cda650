import json
import math
import os
import re
import shlex
import stat
import sys

import pytest

import seeds
from logutil import final, write_log


# ---- tests: p from scipy, cross-checked against closed forms ----

def test_welch_matches_closed_form_at_df_2():
    # Two runs a side with equal spread give Welch df = 2 exactly, where Student's t has the
    # closed-form tail P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)). Here se = sqrt(2e-4) and the
    # gap 0.1, so t = 5 sqrt(2) and p = 1/2 - 5 sqrt(2) / (2 sqrt(52)) = 0.0097 (worked by hand).
    w = seeds.welch([2.80, 2.82], [2.90, 2.92])
    assert w["df"] == pytest.approx(2.0)
    assert w["t"] == pytest.approx(5 * math.sqrt(2))
    assert w["p"] == pytest.approx(0.5 - 5 * math.sqrt(2) / (2 * math.sqrt(52)), rel=1e-9)
    assert w["p"] == pytest.approx(0.009709, abs=1e-6)


def test_welch_hand_computed():
    ours, ref = [2.80, 2.81, 2.82], [2.90, 2.92, 2.94]
    w = seeds.welch(ours, ref)
    a, b = 0.0001 / 3, 0.0004 / 3
    assert w["t"] == pytest.approx(0.11 / math.sqrt(a + b))
    assert w["df"] == pytest.approx((a + b) ** 2 / (a * a / 2 + b * b / 2))
    assert w["p"] < 0.01


def test_requirements_list_scipy():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "requirements.txt")) as f:
        assert any(line.split(">")[0].strip() == "scipy" for line in f)


def test_bar_test_uses_bar_and_our_se():
    ours = [2.80, 2.81, 2.82]
    r = seeds.bar_test(ours, 2.92, 0.005)
    assert r["t"] == pytest.approx((2.92 - 2.81 - 0.005) / (0.01 / math.sqrt(3)))
    assert r["df"] == 2
    assert seeds.welch([1.0], [2.0, 3.0]) is None and seeds.bar_test([1.0], 2.0, 0.005) is None


# ---- stats on logs ----

def make_logs(tmp_path, losses, prefix="ours", **over):
    return [write_log(tmp_path / f"{prefix}{i}.txt", final(s, v, **over))
            for i, (s, v) in enumerate(zip([42, 0, 1234, 7], losses))]


def test_stats_table_and_conversion(tmp_path, capsys):
    logs = make_logs(tmp_path, [2.80, 2.81, 2.82])
    assert seeds.main(["stats", *logs]) == 0
    out = capsys.readouterr().out
    assert "NON-RECORD" not in out
    assert "15,920,000" in out and "1234" in out
    assert "val_loss: mean 2.810000  std 0.010000" in out
    assert "bytes/token (bytes_scored/tokens_scored): 4.00000" in out
    assert f"{4 * math.log(2):.5f}" in out


def test_stats_uses_last_final_json(tmp_path):
    path = write_log(tmp_path / "a.txt", final(1, 2.5), extra_finals=[final(1, 9.9)])
    assert seeds.read_final(path)["val_loss"] == 2.5


def test_stats_missing_keys_print_dash(tmp_path, capsys):
    rec = {k: v for k, v in final(1, 2.8).items() if k not in ("eval_strict_s", "steps")}
    assert seeds.main(["stats", write_log(tmp_path / "a.txt", rec)]) == 0
    assert " - " in capsys.readouterr().out


def test_stats_against_reports_all_three_tests(tmp_path, capsys):
    ours = make_logs(tmp_path, [2.80, 2.81, 2.82])
    ref = make_logs(tmp_path, [2.90, 2.92, 2.94], prefix="ref", config_hash="old")
    assert seeds.main(["stats", *ours, "--against", *ref, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["improvement_nats"] == pytest.approx(0.11)
    assert s["welch"]["p"] < 0.01 and s["bar"]["p"] < 0.01
    assert seeds.main(["stats", *ours, "--against", *ref]) == 0
    out = capsys.readouterr().out
    assert "Welch, ours < ref" in out and "improvement > 0.005 nats" in out and "paired by seed" in out
    assert out.count("p<0.01: yes") == 3


def test_stats_bar_not_met(tmp_path, capsys):
    ours = make_logs(tmp_path, [2.900, 2.901, 2.902])
    ref = make_logs(tmp_path, [2.903, 2.904, 2.905], prefix="ref")
    seeds.main(["stats", *ours, "--against", *ref])
    assert "improvement > 0.005 nats: t=-" in capsys.readouterr().out


def test_reference_without_final_json(tmp_path, capsys):
    ours = make_logs(tmp_path, [2.80, 2.81, 2.82])
    ref = []
    for i, v in enumerate([2.90, 2.92, 2.94]):
        (tmp_path / f"old{i}.txt").write_text(f"step:1 val_loss:3.0 val_bpb:1.3\n"
                                              f"final_roundtrip val_loss:{v} val_bpb:1.2\n")
        ref.append(str(tmp_path / f"old{i}.txt"))
    assert seeds.main(["stats", *ours, "--against", *ref, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ref_mean"] == pytest.approx(2.92)


@pytest.mark.parametrize("key, other", [("config_hash", "different"), ("world_size", 4),
                                        ("source_sha256", "c" * 64)])
def test_refuses_mixed_pool_unless_asked(tmp_path, capsys, key, other):
    logs = make_logs(tmp_path, [2.80, 2.81])
    logs.append(write_log(tmp_path / "other.txt", final(9, 2.7, **{key: other})))
    assert seeds.main(["stats", *logs]) == 2
    err = capsys.readouterr().err
    assert f"{key} differs" in err and "other.txt" in err and f"--allow-mixed {key}" in err
    assert seeds.main(["stats", *logs, "--allow-mixed", "source_sha256" if key != "source_sha256"
                       else "config_hash"]) == 2  # allowing another key does not allow this one
    capsys.readouterr()
    assert seeds.main(["stats", *logs, "--allow-mixed", key]) == 0
    out = capsys.readouterr().out
    assert "NON-RECORD" in out and f"pooled runs of different {key}" in out


def test_record_needs_three_eligible_seeds(tmp_path, capsys):
    logs = make_logs(tmp_path, [2.80, 2.81, 2.82])
    assert seeds.main(["stats", *logs]) == 0
    assert "NON-RECORD" not in capsys.readouterr().out
    assert seeds.main(["stats", *logs[:2]]) == 0
    out = capsys.readouterr().out
    assert "NON-RECORD" in out and "2 distinct seed(s); a record needs at least 3" in out


def test_non_record_banner_from_the_runs_verdict(tmp_path, capsys):
    logs = make_logs(tmp_path, [2.80, 2.81], mode="smoke", record_eligible=False,
                     not_record_because=["SMOKE=1"])
    logs.append(write_log(tmp_path / "x.txt", final(5, 2.8, legality="C3: scored after update")))
    assert seeds.main(["stats", *logs]) == 0
    out = capsys.readouterr().out
    assert "NON-RECORD" in out and "SMOKE=1" in out and "mode=smoke" in out
    assert "C3: scored after update" in out


def test_log_without_record_eligible_is_not_a_record(tmp_path, capsys):
    logs = make_logs(tmp_path, [2.80, 2.81, 2.82])
    rec = {k: v for k, v in final(5, 2.8).items() if k != "record_eligible"}
    logs.append(write_log(tmp_path / "old.txt", rec))
    assert seeds.main(["stats", *logs]) == 0
    assert "old.txt: log predates record_eligible" in capsys.readouterr().out


def test_flipped_record_eligible_is_rechecked_from_the_numbers(tmp_path, capsys):
    # An edited log: record_eligible says yes, the numbers say no (the 1,500 s example).
    logs = make_logs(tmp_path, [2.80, 2.81, 2.82], train_time_s=1500.0, eval_strict_s=900.0,
                     world_size=1, artifact_bytes=16_000_001, mode="record", legality="C4: twice")
    assert seeds.main(["stats", *logs, "--json"]) == 0
    reasons = "\n".join(json.loads(capsys.readouterr().out)["non_record"])
    for why in ("train_time_s=1500 over the 600 limit", "eval_strict_s=900 over the 600 limit",
                "artifact_bytes=16,000,001 over the 16,000,000 limit", "world_size=1",
                "legality=C4: twice", "mode=record"):
        assert why in reasons, why
    odd = {**final(5, 2.8, not_record_because=["bad"]), "_path": "x"}
    assert seeds.run_problems(odd) == ["record_eligible is true but not_record_because lists bad"]
    rec = {k: v for k, v in final(6, 2.8).items() if k != "train_time_s"}
    assert seeds.run_problems({**rec, "_path": "x"}) == ["train_time_s missing"]


def test_unreadable_logs_exit_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("no final line\n")
    assert seeds.main(["stats", str(tmp_path / "a.txt")]) == 2
    assert "a.txt" in capsys.readouterr().err
    (tmp_path / "b.txt").write_text("final_json {broken\n")
    assert seeds.main(["stats", str(tmp_path / "b.txt")]) == 2
    assert seeds.main(["stats", str(tmp_path / "missing.txt")]) == 2


# ---- run ----

def test_run_dry_run_prints_commands(capsys):
    rc = seeds.main(["run", "--seeds", "42", "0", "--nproc", "8", "--prefix", "exp",
                     "--env", "ITERATIONS=10", "--dry-run"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "ITERATIONS=10 SEED=42 RUN_ID=exp_seed42 ARTIFACT_DIR=artifacts/exp_seed42 "
        "torchrun --standalone --nproc_per_node=8 train_gpt.py",
        "ITERATIONS=10 SEED=0 RUN_ID=exp_seed0 ARTIFACT_DIR=artifacts/exp_seed0 "
        "torchrun --standalone --nproc_per_node=8 train_gpt.py",
    ]


def test_run_rejects_bad_env():
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        seeds.main(["run", "--seeds", "1", "--env", "NOEQUALS", "--dry-run"])
    for key in ("SEED", "RUN_ID", "ARTIFACT_DIR"):
        with pytest.raises(SystemExit, match=f"{key}=... is set per seed"):
            seeds.main(["run", "--seeds", "1", "--env", f"{key}=3", "--dry-run"])


FAKE_TORCHRUN = '''#!{python}
"""Stands in for torchrun: writes logs/<RUN_ID>.txt and $ARTIFACT_DIR/final_model.ptz like
train_gpt.py; seed 666 crashes."""
import json, os, sys
seed = int(os.environ["SEED"])
os.makedirs(os.environ.get("ARTIFACT_DIR", "."), exist_ok=True)
with open(os.path.join(os.environ.get("ARTIFACT_DIR", "."), "final_model.ptz"), "w") as f:
    f.write(f"model of seed {{seed}}")
with open(os.path.join("logs", os.environ["RUN_ID"] + ".txt"), "a") as f:
    f.write("argv " + " ".join(sys.argv[1:]) + "\\n")
    if seed == 666:
        sys.exit(3)
    rec = {{"seed": seed, "run_id": os.environ["RUN_ID"], "mode": "train", "legality": "compliant",
           "config_hash": "h", "source_sha256": "s", "val_loss": 2.8 + seed * 1e-4, "val_bpb": 1.0}}
    f.write("final_json " + json.dumps(rec) + "\\n")
'''


@pytest.fixture
def fake_torchrun(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "torchrun"
    exe.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    return tmp_path


def test_run_launches_each_seed_then_stats(fake_torchrun, capsys):
    assert seeds.main(["run", "--seeds", "1", "2", "3", "--nproc", "2", "--prefix", "p"]) == 0
    out = capsys.readouterr().out
    assert "val_loss: mean 2.800200" in out
    log = (fake_torchrun / "logs" / "p_seed2.txt").read_text()
    assert "argv --standalone --nproc_per_node=2 train_gpt.py" in log
    # One artifact directory per seed: no seed overwrote another's final_model.ptz.
    for s in (1, 2, 3):
        assert (fake_torchrun / "artifacts" / f"p_seed{s}" / "final_model.ptz").read_text() == f"model of seed {s}"


def test_run_stops_at_first_failure(fake_torchrun, capsys):
    assert seeds.main(["run", "--seeds", "1", "666", "3", "--prefix", "q"]) == 3
    assert "q_seed666 failed with exit code 3" in capsys.readouterr().err
    assert not (fake_torchrun / "logs" / "q_seed3.txt").exists()


def test_run_refuses_to_overwrite_logs(fake_torchrun, capsys):
    (fake_torchrun / "logs" / "r_seed1.txt").write_text("old\n")
    assert seeds.main(["run", "--seeds", "1", "--prefix", "r"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_zero_spread_does_not_crash():
    assert seeds.welch([2.0, 2.0], [3.0, 3.0])["p"] == 0.0
    assert seeds.bar_test([2.0, 2.0], 2.001, 0.005)["p"] == 1.0


def test_metric_bpb_converts_with_our_bytes_per_token(tmp_path, capsys):
    ours = make_logs(tmp_path, [2.80, 2.81, 2.82])
    # Reference from another tokenizer: 3 bytes/token, so its val_loss is not comparable.
    ref = make_logs(tmp_path, [2.80, 2.82, 2.84], prefix="ref", bytes_scored=3_000_000)
    assert seeds.main(["stats", *ours, "--against", *ref]) == 0
    assert "bytes/token differs" in capsys.readouterr().err
    assert seeds.main(["stats", *ours, "--against", *ref, "--metric", "bpb", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    # ref bpb = loss / (4 ln2) (as written by logutil), re-expressed at our 4 bytes/token.
    assert s["ref_mean"] == pytest.approx(2.82)
    assert seeds.main(["stats", *ours, "--against", *ref, "--metric", "bpb"]) == 0
    assert "mean val_bpb x nats/bpb 2.820000" in capsys.readouterr().out  # nats, not labelled bpb


def test_config_hash_ignores_per_seed_env():
    import train_gpt

    a = train_gpt.load_config({"SEED": "1", "RUN_ID": "a", "ARTIFACT_DIR": "artifacts/a"})
    b = train_gpt.load_config({"SEED": "2", "RUN_ID": "b", "ARTIFACT_DIR": "artifacts/b"})
    assert a.config_hash() == b.config_hash()


def recipe_lines():
    """The command lines of README.md's 'A record run' block (continuations joined)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read().split("## A record run", 1)[1].split("\n## ", 1)[0]
    block = "\n".join(ln[4:] for ln in text.splitlines() if ln.startswith("    "))
    return [ln.split("  #")[0].strip() for ln in block.replace("\\\n", " ").splitlines()], root


def test_readme_record_recipe_runs_from_the_repo_root(capsys):
    lines, root = recipe_lines()
    assert not any(ln.startswith("cd ") or " cd " in ln for ln in lines), lines
    words = {ln.split()[1]: shlex.split(ln) for ln in lines if ln.startswith("python ")}
    with open(os.path.join(root, "train_gpt.py")) as f:
        src = f.read()
    defaults = dict(re.findall(r'^    (data_path|tokenizer_path): str = "([^"]*)"', src, re.M))
    dl = words["data/download.py"]
    # The shards land where the default DATA_PATH looks (relative to the repo root, the cwd), and
    # the tokenizer where TOKENIZER_PATH looks (download.py's default --tokenizer-dir).
    assert os.path.normpath(dl[dl.index("--out") + 1]) == os.path.normpath(defaults["data_path"])
    assert "--tokenizer-dir" not in dl
    assert os.path.normpath(os.path.dirname(defaults["tokenizer_path"])) == os.path.join("data", "tokenizers")
    packed = words["tools/pack.py"][words["tools/pack.py"].index("-o") + 1]
    run = words["tools/seeds.py"]
    assert run[2] == "run" and run[run.index("--script") + 1] == packed
    assert seeds.main(run[2:] + ["--dry-run"]) == 0
    launches = capsys.readouterr().out.strip().splitlines()
    assert len(launches) >= 3 and all(ln.endswith(f"--nproc_per_node=8 {packed}") for ln in launches)


def test_paired_by_seed_sees_a_small_lever_under_a_large_seed_spread(tmp_path, capsys):
    """Seeds 42, 0, 1234 spread by 0.03; the lever gains ~0.001 at every seed: Welch cannot see
    it, the paired test can."""
    ours = make_logs(tmp_path, [2.8000, 2.8300, 2.8600])
    ref = make_logs(tmp_path, [2.8010, 2.8312, 2.8609], prefix="ref")
    assert seeds.main(["stats", *ours, "--against", *ref, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["welch"]["p"] > 0.4
    assert s["paired"]["n"] == 3 and s["paired"]["mean_diff"] == pytest.approx(0.001033, abs=1e-6)
    assert s["paired"]["p"] < 0.01
    assert seeds.main(["stats", *ours, "--against", *ref]) == 0
    assert "paired by seed, ours < ref (3 seeds, improvement 0.001033 nats" in capsys.readouterr().out


def test_paired_uses_common_seeds_once_each():
    assert seeds.paired({42: 1.0, 0: 2.0, 7: 3.0}, {42: 1.5, 0: 2.4})["n"] == 2
    assert seeds.paired({42: 1.0}, {42: 1.5, 0: 2.4}) is None  # one common seed: no spread


def test_paired_is_off_when_a_side_repeats_a_seed(tmp_path, capsys):
    ours = make_logs(tmp_path, [2.80, 2.81])
    twice = [write_log(tmp_path / f"r{i}.txt", final(42, v)) for i, v in enumerate([2.82, 2.83])]
    assert seeds.main(["stats", *ours, "--against", *twice, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paired"] is None
