"""Muon, schedules and the strict config."""
import pytest
import torch

import train_gpt as tg


def test_polar_express_output_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in ((4, 512, 512), (3, 2048, 512), (2, 256, 512)):
        g = torch.randn(*shape)
        x = tg.orthogonalize(g, 5)
        s = torch.linalg.svdvals(x)
        # a square Gaussian has a few near-zero singular values that 5 steps cannot lift
        inside = ((s > 0.6) & (s < 1.25)).float().mean()
        assert inside > 0.98 and s.max() < 1.25, (shape, inside, s.max())


def test_lr_schedule_values():
    h = tg.load_config({})
    assert tg.lr_multiplier(0.0, h) == 1.0
    assert tg.lr_multiplier(0.149, h) == 1.0
    assert tg.lr_multiplier(0.575, h) == pytest.approx(0.5)
    assert tg.lr_multiplier(0.95, h) == pytest.approx(0.1)  # floor MIN_LR
    assert tg.muon_momentum(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum(750, h) == pytest.approx(0.945)
    assert tg.muon_momentum(10_000, h) == pytest.approx(0.97)


def test_config_defaults_are_the_record():
    h = tg.load_config({})
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (11, 512, 8, 4, 4)
    assert (h.attn_gate, h.sparse_attn_gate_scale, h.smear_gate_enabled) == ("sparse", 0.5, True)
    assert (h.matrix_lr, h.muon_wd, h.warmdown_frac, h.min_lr, h.ema_decay) == (0.026, 0.095, 0.85, 0.1, 0.9965)
    assert h.train_batch_tokens == 786432 and h.slot_tokens == 98304


def test_config_overrides_and_types():
    h = tg.load_config({"MATRIX_LR": "0.03", "SMEAR_GATE_ENABLED": "0", "ITERATIONS": "7", "PATH": "/x"})
    assert h.matrix_lr == 0.03 and h.smear_gate_enabled is False and h.iterations == 7
    with pytest.raises(ValueError, match="ITERATIONS"):
        tg.load_config({"ITERATIONS": "seven"})


@pytest.mark.parametrize("name,match", [
    ("MATRIX_LRR", "did you mean MATRIX_LR"),
    ("TTT_LORA_RANKK", "unknown env var"),
    ("SPARSE_ATTN_GATE_ENABLED", "ATTN_GATE=sparse"),
    ("CASEOPS_ENABLED", "manifest"),
    ("SMEAR_GATE", "SMEAR_GATE_ENABLED"),
])
def test_config_rejects_unknown_names(name, match):
    with pytest.raises(ValueError, match=match):
        tg.load_config({name: "1"})


def test_config_hash_ignores_seed_only():
    a, b = tg.load_config({"SEED": "1"}), tg.load_config({"SEED": "2", "RUN_ID": "x"})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != tg.load_config({"MATRIX_LR": "0.03"}).config_hash()


def test_attn_gate_enum_is_checked():
    with pytest.raises(ValueError, match="ATTN_GATE"):
        tg.load_config({"ATTN_GATE": "both"})


def test_attn_backend_choice_is_checked():
    with pytest.raises(ValueError, match="ATTN_BACKEND"):
        tg.load_config({"ATTN_BACKEND": "fa2"})
    cpu = torch.device("cpu")
    assert tg.pick_attention_backend(cpu) == "sdpa" == tg.pick_attention_backend(cpu, "sdpa")
    for gpu_only in ("fa3", "varlen", "flex"):  # asked for explicitly: an error, never a silent swap
        with pytest.raises(RuntimeError, match=f"ATTN_BACKEND={gpu_only}"):
            tg.pick_attention_backend(cpu, gpu_only)


def test_throughput_check_warns_only_well_below_the_reference():
    h, lines = tg.load_config({}), []
    ref = tg.REFERENCE_TOK_S["H100"]
    ms_at = lambda frac: h.train_batch_tokens / (frac * ref) * 1000 / 8  # noqa: E731 (8 GPUs)
    tg.throughput_check({"step_avg_ms_noloop": ms_at(0.95)}, h, 8, "NVIDIA H100 80GB HBM3", lines.append)
    assert "reference 1,040,000" in lines[0] and len(lines) == 1
    tg.throughput_check({"step_avg_ms_noloop": ms_at(0.5)}, h, 8, "NVIDIA H100 80GB HBM3", lines.append)
    assert lines[-1].startswith("WARNING: throughput is 50%")
    tg.throughput_check({"step_avg_ms_noloop": ms_at(0.5)}, h, 8, "NVIDIA A100", lines.append)
    assert "reference" not in lines[-1] and not lines[-1].startswith("WARNING")
