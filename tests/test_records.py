"""What a run's final_json claims about itself (issue 13): record eligibility computed from what
ran, the env overrides, a config hash free of paths, self-describing artifacts that EVAL_ONLY
rebuilds the right model from, and an eval budget that starts at the artifact load."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import legality
import train_gpt as tg
from test_smoke_run import REPO, final_json

CPU = legality.CPU


# ---- record_blockers, case by case -----------------------------------------------------------


def eligible_final(**over) -> dict:
    """A final_json that passes every rule; `over` breaks one."""
    rec = dict(mode="train", world_size=8, gpu="NVIDIA H100 80GB HBM3", train_plus_hessians_s=596.1,
               eval_strict_s=571.0, artifact_bytes=15_950_000, legality="compliant",
               data=dict(variant="caseops", train_shards=80, val_targets=47_853_343))
    rec.update(over)
    return rec


def blockers(h=None, **over) -> list:
    return tg.record_blockers(eligible_final(**over), h or tg.load_config({}))


def test_an_eligible_run_has_no_blockers():
    assert blockers() == []
    assert blockers(data=dict(variant="caseops", train_shards=80, val_targets=47_851_520)) == []


@pytest.mark.parametrize("over, env, words", [
    (dict(mode="smoke"), {}, "SMOKE"),
    (dict(mode="eval_only"), {}, "no training"),
    (dict(world_size=1), {}, "world_size 1"),
    (dict(gpu="NVIDIA H200"), {}, "gpu NVIDIA H200"),
    (dict(gpu="cpu"), {}, "gpu cpu"),
    ({}, {"MAX_WALLCLOCK_SECONDS": "0"}, "MAX_WALLCLOCK_SECONDS=0"),
    ({}, {"MAX_WALLCLOCK_SECONDS": "700"}, "MAX_WALLCLOCK_SECONDS=700"),
    (dict(train_plus_hessians_s=600.4), {}, "training + Hessians 600.4s"),
    (dict(eval_strict_s=612.0), {}, "strict eval 612.0s"),
    (dict(artifact_bytes=16_000_001), {}, "artifact 16000001 B"),
    (dict(legality="C3: pre-quant TTT trained on val before scoring"), {}, "legality: C3"),
    ({}, {"TTT_ENABLED": "0"}, "TTT_ENABLED=0"),
    (dict(data=dict(variant="caseops", train_shards=1499, val_targets=47_853_343)), {}, "1499 train shards"),
    (dict(data=dict(variant="caseops", train_shards=80, val_targets=9_570_000)), {}, "9570000 val targets"),
    (dict(data=dict(variant="sp", train_shards=80, val_targets=40_540_160)), {}, "only CaseOps"),
])
def test_each_rule_blocks_alone(over, env, words):
    why = blockers(tg.load_config(env), **over)
    assert len(why) == 1 and words in why[0], why


def test_eval_only_skips_the_training_rules():
    why = blockers(tg.load_config({"MAX_WALLCLOCK_SECONDS": "0"}), mode="eval_only")
    assert len(why) == 1 and why[0].startswith("mode eval_only")


# ---- env overrides and the config hash ---------------------------------------------------------


def test_load_config_records_declared_env_names():
    h = tg.load_config({"MATRIX_LR": "0.03", "SMOKE": "1", "HOME": "/root", "PATH": "/bin"})
    assert h.env_overrides == {"MATRIX_LR": "0.03", "SMOKE": "1"}
    assert tg.load_config({}).env_overrides == {}


def test_config_hash_leaves_out_paths_and_logging():
    base = tg.load_config({}).config_hash("data1")
    for k, v in (("DATA_PATH", "/other/data"), ("TOKENIZER_PATH", "/x/tok.model"), ("ARTIFACT_DIR", "/y"),
                 ("EVAL_ONLY", "/z/final_model.ptz"), ("TRAIN_LOG_EVERY", "7"), ("SAVE_PREQUANT", "1"),
                 ("VAL_LOSS_EVERY", "100"), ("SEED", "7"), ("RUN_ID", "r")):
        assert tg.load_config({k: v}).config_hash("data1") == base, k
    assert tg.load_config({}).config_hash("data2") != base
    assert tg.load_config({"TTT_LORA_RANK": "64"}).config_hash("data1") != base


def test_manifest_identity_ignores_where_the_data_lives(smoke_dir, tmp_path):
    """Two copies of one dataset (different dirs, different source paths in the manifest) have one
    identity; dropping a train shard changes it."""
    copy = str(tmp_path / "elsewhere")
    shutil.copytree(smoke_dir, copy)
    man = json.load(open(os.path.join(copy, "manifest.json")))
    man["sources"] = [dict(s, path="/mnt/somewhere/else.jsonl") for s in man["sources"]]
    man["build"]["sources"] = man["sources"]
    json.dump(man, open(os.path.join(copy, "manifest.json"), "w"))

    def spec(path):
        return tg.load_data_spec(tg.load_config({"SMOKE": "1", "DATA_PATH": path,
                                                 "TOKENIZER_PATH": os.path.join(path, "smoke_caseops_1024.model")}))
    a, b = spec(smoke_dir), spec(copy)
    assert a.manifest_sha256 != b.manifest_sha256 and a.identity == b.identity
    os.remove(sorted(b.train_files)[-1])
    assert spec(copy).identity != a.identity


# ---- self-describing artifacts -----------------------------------------------------------------


def test_every_field_is_classified_once():
    """A new Hyperparameters field must say whether it shapes the model (ARCH_FIELDS), the eval
    (EVAL_FIELDS) or neither (RUN_FIELDS), so EVAL_ONLY cannot forget it."""
    classes = tg.ARCH_FIELDS + tg.EVAL_FIELDS + tg.RUN_FIELDS
    assert sorted(classes) == sorted(f.name for f in dataclasses.fields(tg.Hyperparameters))


def tiny_blob(h, **meta_over):
    model = legality.random_model(h)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    qstate = tg.quantize_state_dict(sd, {}, h, log=lambda *a: None)
    return tg.serialize(qstate, h, {**tg.artifact_meta(h, "data1"), **meta_over}), qstate


def test_artifact_carries_its_configuration():
    h = legality.tiny_config(ATTN_GATE="out", SEED=7)
    blob, qstate = tiny_blob(h)
    meta = tg.read_meta(blob)
    assert meta["config"]["attn_gate"] == "out" and meta["config"]["seed"] == 7
    assert meta["config_hash"] == h.config_hash("data1") and meta["data"] == "data1"
    assert meta["source_sha256"] == tg.hashlib.sha256(tg.source_text().encode()).hexdigest()
    assert set(meta["config"]) == set(tg.ARCH_FIELDS + tg.EVAL_FIELDS)
    assert tg.deserialize(blob).keys() == qstate.keys()
    n, info = int.from_bytes(blob[14:18], "little"), tg.brotli.compress(b'{"config": {}}')
    with pytest.raises(ValueError, match="checksum"):  # the checksum covers the configuration too
        tg.deserialize(blob[:14] + len(info).to_bytes(4, "little") + info + blob[18 + n:])


def test_old_container_versions_are_refused():
    blob, _ = tiny_blob(legality.tiny_config())
    for version in (1, 2):
        with pytest.raises(ValueError, match=f"version {version} carries no configuration"):
            tg.read_meta(blob[:4] + bytes([version]) + blob[5:])


def eval_only_env(path, **env):
    return tg.load_config({"SMOKE": "1", "EVAL_ONLY": path, **env})


def test_artifact_config_rebuilds_the_model_it_holds():
    meta = tg.artifact_meta(legality.tiny_config(ATTN_GATE="out", SEED=7, TTT_LORA_RANK=3), "d")
    h, overrides = tg.artifact_config(eval_only_env("a.ptz"), meta)
    assert (h.attn_gate, h.seed, h.ttt_lora_rank, overrides) == ("out", 7, 3, {})
    h, overrides = tg.artifact_config(eval_only_env("a.ptz", ATTN_GATE="out", TTT_LORA_RANK="5"), meta)
    assert h.attn_gate == "out" and h.ttt_lora_rank == 5 and overrides == {"TTT_LORA_RANK": (3, 5)}
    assert h.env_overrides["TTT_LORA_RANK"] == "5"
    with pytest.raises(ValueError, match="ATTN_GATE=sparse .*ATTN_GATE=out"):
        tg.artifact_config(eval_only_env("a.ptz", ATTN_GATE="sparse"), meta)
    with pytest.raises(ValueError, match="another version"):
        tg.artifact_config(eval_only_env("a.ptz"), dict(meta, config={**meta["config"], "new_knob": 1}))
    with pytest.raises(ValueError, match="no configuration"):
        tg.artifact_config(eval_only_env("a.ptz"), {})


def test_prequant_artifact_stays_non_compliant_in_eval_only():
    meta = tg.artifact_meta(legality.tiny_config(PREQUANT_TTT_EPOCHS=1), "d")
    h, _ = tg.artifact_config(eval_only_env("a.ptz"), meta)
    assert h.prequant_ttt_epochs == 1  # evaluate() marks every target as trained on
    with pytest.raises(ValueError, match="PREQUANT_TTT_EPOCHS=0 .*PREQUANT_TTT_EPOCHS=1"):
        tg.artifact_config(eval_only_env("a.ptz", PREQUANT_TTT_EPOCHS="0"), meta)
    legal = tg.artifact_meta(legality.tiny_config(), "d")  # EVAL_ONLY never trains on val
    with pytest.raises(ValueError, match="PREQUANT_TTT_EPOCHS=1 disagrees with EVAL_ONLY"):
        tg.artifact_config(eval_only_env("a.ptz", PREQUANT_TTT_EPOCHS="1"), legal)


# ---- the eval budget runs from the artifact load -----------------------------------------------


def test_budget_spent_before_ttt_cuts_global_sgd():
    """A budget started before final_evaluation (as main() does, before the artifact load) that is
    already spent leaves no time for global SGD: every phase is skipped and said so; every target
    is still scored, and the strict total counts the time before the eval."""
    h, val = legality.tiny_config(SLIDING_ENABLED=0, EVAL_BUDGET_SECONDS=600), legality.synthetic_val()
    model, lines = legality.random_model(h), []
    budget = tg.Timer(CPU.device, h.eval_budget_seconds)
    budget.t0 -= 1000.0  # as if loading the artifact had taken 1000 s
    out = tg.final_evaluation(model, val, h, CPU, lines.append, budget)
    skipped = [l for l in lines if "skipped (budget" in l]
    assert len(skipped) == h.phased_ttt_num_phases and not any("sgd_steps" in l for l in lines)
    assert out["tokens_scored"] == val.num_targets and out["legality"] == "compliant"
    assert out["eval_strict_s"] >= 1000.0


# ---- end to end: a smoke run, then EVAL_ONLY of its artifact -----------------------------------


def run_script(smoke_dir, tmp_path, run_id, **env):
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "SMOKE"))},
            "SMOKE": "1", "DATA_PATH": smoke_dir, "RUN_ID": run_id, "ITERATIONS": "3", "WARMUP_STEPS": "0",
            "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model"), **env}
    return subprocess.run([sys.executable, os.path.join(REPO, "train_gpt.py")], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=900)


def test_smoke_artifact_describes_itself(smoke_dir, tmp_path):
    """Trained with model and eval fields off the smoke defaults (TTT and sliding off keep the CPU
    eval short); EVAL_ONLY without them rebuilds the same model and eval and gets the same score."""
    shape = dict(ATTN_GATE="out", MODEL_DIM="32", SLIDING_ENABLED="0", TTT_ENABLED="0")
    res = run_script(smoke_dir, tmp_path, "gate_out", ARTIFACT_DIR=str(tmp_path), **shape)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = open(tmp_path / "logs" / "gate_out.txt").read()
    trained = final_json(log)
    assert trained["mode"] == "smoke" and trained["record_eligible"] is False
    why = " | ".join(trained["not_record_because"])
    assert "SMOKE" in why and "world_size 1" in why and "gpu cpu" in why and "MAX_WALLCLOCK" in why
    assert "TTT_ENABLED=0" in why and "train shards" in why
    assert "record_eligible: no (" in log
    assert trained["env_overrides"]["ATTN_GATE"] == "out" and trained["gpu"] == "cpu"
    assert trained["torch_version"] == torch.__version__ and trained["data"]["variant"] == "caseops"

    artifact = str(tmp_path / "final_model.ptz")
    res = run_script(smoke_dir, tmp_path, "reeval", EVAL_ONLY=artifact)  # no ATTN_GATE in the env
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    again = final_json(open(tmp_path / "logs" / "reeval.txt").read())
    assert again["mode"] == "eval_only" and again["val_bpb"] == pytest.approx(trained["val_bpb"], rel=1e-6)
    assert again["scored_by"] == "eval_diagnostic" and again["eval_overrides"] == {}
    assert again["config_hash"] == trained["config_hash"] and again["seed"] == trained["seed"]
    assert again["artifact_bytes"] == again["code_bytes"] + os.path.getsize(artifact)
    assert again["code_bytes"] == os.path.getsize(os.path.join(REPO, "train_gpt.py"))

    res = run_script(smoke_dir, tmp_path, "wrong_gate", EVAL_ONLY=artifact, ATTN_GATE="sparse")
    assert res.returncode != 0 and "ATTN_GATE=sparse" in res.stderr and "ATTN_GATE=out" in res.stderr


def test_training_cap_keeps_the_hessians_inside_the_budget():
    """The Hessians read training data, so their reserve comes off the training clock: 6 s on 8
    GPUs at 16 calibration batches, x 8 / world size, x batches / 16 (the field's 32 batches)."""
    h = tg.load_config({})
    assert tg.training_cap(h, 8) == 594.0 and tg.training_cap(h, 1) == 552.0
    assert tg.training_cap(tg.load_config({"GPTQ_CALIBRATION_BATCHES": "32"}), 8) == 588.0
    assert tg.training_cap(tg.load_config({"GPTQ_RESERVE_SECONDS": "0"}), 1) == 600.0
