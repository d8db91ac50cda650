"""End to end on CPU: the SMOKE configuration trains (the loss falls), quantizes, writes and reloads
the artifact, scores every val target, and ends its log with final_json. Also: a packed launcher
runs the same script and counts its own size as code_bytes."""
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, smoke_dir, tmp_path, run_id, **env):
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "SMOKE"))},
            "SMOKE": "1", "DATA_PATH": smoke_dir, "RUN_ID": run_id, "ITERATIONS": "14",
            "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model"),
            "ARTIFACT_DIR": str(tmp_path / run_id), **env}
    res = subprocess.run([sys.executable, script], cwd=tmp_path, env=full, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return open(tmp_path / "logs" / f"{run_id}.txt").read()


def final_json(log: str) -> dict:
    return json.loads([l for l in log.splitlines() if l.startswith("final_json ")][-1][11:])


def test_smoke_run_end_to_end(smoke_dir, tmp_path):
    log = run(os.path.join(REPO, "train_gpt.py"), smoke_dir, tmp_path, "smoke_e2e")
    losses = [float(x) for x in re.findall(r"train_loss: ([\d.]+)", log)]
    assert losses[-1] < losses[0] - 1.0, losses
    out = final_json(log)
    assert {"val_bpb", "val_loss", "steps", "step_avg_ms", "train_time_s", "tokens_per_s",
            "peak_mem_mib", "world_size", "config_hash", "val_bpb_prequant", "val_bpb_quant",
            "model_bytes", "code_bytes", "artifact_bytes", "quant_time_s", "serialize_time_s",
            "val_bpb_sliding", "eval_time_s", "eval_strict_s", "tokens_scored", "bytes_scored",
            "legality", "val_bpb_raw"} <= set(out)
    assert out["legality"] == "compliant" and out["scored_by"] == "eval_ttt"
    n_targets = int(re.search(r"val_targets (\d+)", log).group(1))
    assert out["mode"] == "smoke" and out["tokens_scored"] == n_targets
    assert out["code_bytes"] == os.path.getsize(os.path.join(REPO, "train_gpt.py"))
    assert out["artifact_bytes"] == out["code_bytes"] + out["model_bytes"] < 16_000_000
    assert 0 < out["val_bpb_prequant"] < out["val_bpb_quant"] + 0.05 < 10
    assert "grad_accum 8 attention sdpa" in log  # CPU: SDPA with an explicit document mask
    assert out["compiled_graphs"] == {"warmup": 0, "training": 0, "after_training": 0}  # eager on CPU
    assert out["mlp_clip_sigmas_used"] == 11.5  # the smoke model fits: no requantization


def test_packed_launcher_counts_itself(smoke_dir, tmp_path):
    packed = tmp_path / "packed" / "train_gpt.py"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "pack.py"),
                    os.path.join(REPO, "train_gpt.py"), "-o", str(packed)], check=True)
    log = run(str(packed), smoke_dir, tmp_path, "smoke_packed", ITERATIONS="2", WARMUP_STEPS="0")
    out = final_json(log)
    source = os.path.join(REPO, "train_gpt.py")
    assert out["code_bytes"] == os.path.getsize(packed) < os.path.getsize(source) / 2
    src = open(os.path.join(REPO, "train_gpt.py"), "rb").read()
    import hashlib
    assert out["source_sha256"] == hashlib.sha256(src).hexdigest()


def test_smoke_run_with_the_field_levers(smoke_dir, tmp_path):
    """Issue 15's eval/quant levers together at SMOKE size (each is off by default): no-Q/V
    adapters, local LR 0.8 with LoRA LR 8e-5, one phase, the short-doc chunk schedule, AWQ-lite,
    LQER rank 2 / group 32 / top 4, more calibration batches and the token n-gram tilt."""
    log = run(os.path.join(REPO, "train_gpt.py"), smoke_dir, tmp_path, "smoke_levers", ITERATIONS="2",
              WARMUP_STEPS="0", TTT_LORA_TARGETS="k,o,mlp,head", TTT_LOCAL_LR_MULT="0.8",
              TTT_LORA_LR="8e-5", PHASED_TTT_NUM_PHASES="1", TTT_CHUNK_SCHEDULE="256:8,2000:24",
              AWQ_LITE_GROUPS="1", LQER_RANK="2", LQER_ASYM_GROUP="32", LQER_TOP_K="4",
              GPTQ_CALIBRATION_BATCHES="4", NGRAM_BOOST="2.625", NGRAM_ORDER="4")
    out = final_json(log)
    assert out["legality"] == "compliant" and out["scored_by"] == "eval_ttt"
    assert out["tokens_scored"] == int(re.search(r"val_targets (\d+)", log).group(1))
    assert "+awq_int8" in log and "+lqer_asym" in log
    hinted = [int(n) for n in re.findall(r"ngram_tilt: (\d+) of", log)]
    assert hinted and max(hinted) > 0
