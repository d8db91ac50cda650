"""tools/ab.py: quantization/eval variants on the same SAVE_PREQUANT weights."""
import json
import os

import pytest
import torch

import ab
import train_gpt as tg


def checkpoint(smoke_dir, tmp_path) -> str:
    """A SMOKE model with random weights everywhere (the zero-init projections would make every
    block the identity, and LQER a no-op), saved as SAVE_PREQUANT does."""
    h = tg.load_config({"SMOKE": "1", "DATA_PATH": smoke_dir, "ARTIFACT_DIR": str(tmp_path),
                        "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model")})
    torch.manual_seed(0)
    model = tg.GPT(h, 1, "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.05)
    path = str(tmp_path / "final_model.pt")
    tg.save_prequant(path, model.state_dict(), h, True)
    return path


def test_ab_same_weights_delta(smoke_dir, tmp_path, monkeypatch):
    """An empty variant reproduces the base exactly; LQER_ENABLED=0 moves val_bpb. CPU time: the
    val set is cut to 4 slots and the eval warmup (which compiles nothing on CPU) is skipped."""
    path, out, real = checkpoint(smoke_dir, tmp_path), str(tmp_path / "ab.json"), tg.load_val_data

    def first_windows(spec, h):  # 4 eval windows keep the test short; the pipeline is unchanged
        v = real(spec, h)
        n = 4 * h.slot_tokens
        return tg.ValData(v.tokens[:n + 1], v.target_bytes[:n], v.bos_id)

    monkeypatch.setattr(tg, "load_val_data", first_windows)
    monkeypatch.setattr(tg, "eval_warmup", lambda *a: None)
    monkeypatch.setenv("TTT_ENABLED", "0")  # eval-side names from the env apply to every variant
    monkeypatch.setenv("SLIDING_ENABLED", "0")
    monkeypatch.setenv("GPTQ_CALIBRATION_BATCHES", "1")
    rc = ab.main(["--checkpoint", path, "--variant", "base:", "--variant", "same:",
                  "--variant", "nolqer:LQER_ENABLED=0", "--code-bytes", "100000", "--json", out])
    assert rc == 0
    rows = {r["variant"]: r for r in json.load(open(out))["rows"]}
    assert rows["same"]["delta"] == 0.0 and rows["base"]["scored_by"] == "eval_diagnostic"
    assert rows["same"]["quantized_as"] == "base" and rows["nolqer"]["quantized_as"] == "nolqer"
    assert abs(rows["nolqer"]["delta"]) > 1e-6
    assert rows["nolqer"]["model_bytes"] < rows["base"]["model_bytes"]
    assert all(0 <= r["warmup_s"] <= r["strict_s"] and r["eval_time_s"] <= r["strict_s"] <= r["seconds"]
               for r in rows.values())  # the scoring pass and the warmup are parts of the strict eval


def test_ab_artifact_scores_the_saved_file_as_the_checkpoint_run_did(smoke_dir, tmp_path, monkeypatch):
    """--artifact scores a written .ptz with the config it carries: the checkpoint run's base
    artifact gives that run's val_bpb again; eval variants move it; quantization ones and an env
    that disagrees with the stored model are refused before any work."""
    path, real = checkpoint(smoke_dir, tmp_path), tg.load_val_data
    monkeypatch.setattr(tg, "load_val_data", lambda spec, h: (lambda v: tg.ValData(
        v.tokens[:4 * h.slot_tokens + 1], v.target_bytes[:4 * h.slot_tokens], v.bos_id))(real(spec, h)))
    monkeypatch.setattr(tg, "eval_warmup", lambda *a: None)
    for k, v in dict(TTT_ENABLED="0", SLIDING_ENABLED="0", GPTQ_CALIBRATION_BATCHES="1").items():
        monkeypatch.setenv(k, v)
    one, two = str(tmp_path / "ck.json"), str(tmp_path / "art.json")
    assert ab.main(["--checkpoint", path, "--variant", "base:", "--code-bytes", "100000", "--json", one]) == 0
    art = str(tmp_path / "ab_base.ptz")
    monkeypatch.setenv("SMOKE", "1")  # a CPU run; the model and eval fields are the artifact's
    monkeypatch.setenv("DATA_PATH", smoke_dir)  # paths are the machine's, not the artifact's
    monkeypatch.setenv("TOKENIZER_PATH", os.path.join(smoke_dir, "smoke_caseops_1024.model"))
    assert ab.main(["--artifact", art, "--variant", "base:", "--variant", "sl:SLIDING_ENABLED=1",
                    "--json", two]) == 0
    ck_rows, rows = json.load(open(one))["rows"], {r["variant"]: r for r in json.load(open(two))["rows"]}
    assert rows["base"]["val_bpb"] == ck_rows[0]["val_bpb"] and rows["base"]["quantized_as"] == "artifact"
    assert rows["sl"]["scored_by"] == "eval_sliding" and rows["sl"]["model_bytes"] == os.path.getsize(art)
    assert ab.main(["--artifact", art, "--variant", "nolqer:LQER_ENABLED=0"]) == 2
    monkeypatch.setenv("NUM_LAYERS", "3")
    assert ab.main(["--artifact", art, "--variant", "base:"]) == 2


def test_ab_variant_values_may_hold_commas():
    name, over = ab.parse_variant("noqv:TTT_LORA_TARGETS=k,o,mlp,head,"
                                  "TTT_CHUNK_SCHEDULE=256:8,2000:24,AWQ_LITE_GROUPS=1 NGRAM_BOOST=2.625")
    assert name == "noqv" and over == dict(ttt_lora_targets="k,o,mlp,head", awq_lite_groups=1,
                                           ttt_chunk_schedule="256:8,2000:24", ngram_boost=2.625)
    assert ab.parse_variant("two:LQER_ENABLED=0,TTT_ENABLED=0")[1] == dict(lqer_enabled=False, ttt_enabled=False)


@pytest.mark.parametrize("spec", ["arch:NUM_LAYERS=3", "lr:MATRIX_LR=0.01", "typo:LQER_ENABLD=0", "noname"])
def test_ab_refuses_non_eval_overrides(spec):
    with pytest.raises(ValueError):
        ab.parse_variant(spec)


def test_ab_refuses_env_that_changes_training(smoke_dir, tmp_path, monkeypatch):
    """The checkpoint fixes the training side: an env value that differs is refused before any work."""
    path = checkpoint(smoke_dir, tmp_path)
    monkeypatch.setenv("MODEL_DIM", "128")
    assert ab.main(["--checkpoint", path, "--variant", "base:"]) == 2
    assert ab.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
