"""Synthetic train_gpt.py logs for the tool tests."""
import json


def final(seed, val_loss, **over):
    """A record-eligible final_json record in the contract's shape (COMMON.md); bytes/token 4.0
    so nats/token = bpb * 4 ln2."""
    import math
    rec = {
        "run_id": f"t_seed{seed}", "seed": seed, "mode": "train", "record_eligible": True,
        "not_record_because": [], "env_overrides": {"SEED": str(seed), "RUN_ID": f"t_seed{seed}"},
        "legality": "compliant", "config_hash": "cfg123", "source_sha256": "a" * 64,
        "world_size": 8, "gpu": "NVIDIA H100 80GB HBM3", "torch_version": "2.9.1+cu128",
        "code_bytes": 20_000, "model_bytes": 15_900_000, "artifact_bytes": 15_920_000,
        "model_sha256": "b" * 64, "val_loss": val_loss, "val_bpb": val_loss / (4 * math.log(2)),
        "tokens_scored": 1_000_000, "bytes_scored": 4_000_000, "steps": 5000,
        "step_avg_ms": 110.5, "train_time_s": 588.0, "eval_strict_s": 480.0,
        "data": {"variant": "caseops", "train_shards": 80, "val_targets": 47_851_520,
                 "manifest_sha256": "d" * 64},
    }
    rec.update(over)
    return rec


def write_log(path, rec, device=None, extra_finals=()):
    """Write a log with noise lines, optional earlier final_json lines, then `rec` last."""
    lines = ["hparams: ...", "step:1/5000 train_loss:9.0"]
    if device:
        lines.insert(0, f"device: {device}")
    lines += ["final_json " + json.dumps(r) for r in extra_finals]
    lines += ["final_json " + json.dumps(rec), "done"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)
