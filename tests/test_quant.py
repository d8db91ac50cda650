"""Tests for quant_section.py (GPTQ + SDClip, LQER, int8 gates, fp16 passthrough, container).
CPU only, small shapes; run with `python -m pytest tests/test_quant.py -q` from the repo root."""

import os
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402
from train_gpt import (  # noqa: E402
    FP16_TINY, awq_groups, clip_range, dequantize_entry, dequantize_groups, dequantize_state_dict,
    deserialize, gptq_quantize, lqer_factors, lqer_reconstruct, quantize_fit, quantize_groups,
    quantize_state_dict, rtn_quantize, sdclip_scale, serialize, Timer,
)


def config(**kw):
    base = dict(matrix_bits=6, embed_bits=7, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5,
                embed_clip_sigmas=14.0, lqer_enabled=True, lqer_rank=4, lqer_top_k=3,
                lqer_asym_group=64, awq_lite_groups=0, awq_lite_group_size=64, num_loops=0,
                loop_start=3, loop_end=5)
    return types.SimpleNamespace(**{**base, **kw})


def trained_like(rows, cols, seed=0):
    """Gaussian with lognormal row/column gains and a few heavy-tailed (Student-t) rows."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W *= torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    W *= torch.exp(0.3 * torch.randn(1, cols, generator=g))
    with torch.random.fork_rng():  # StudentT takes no generator: seed it without touching the caller's RNG
        torch.manual_seed(seed)
        heavy = torch.distributions.StudentT(2.5).sample((4, cols)) * 0.02
    W[: 4] = heavy
    return W


def correlated_inputs(n, cols, seed=0):
    """X = Z @ M with a random mixing M, so that H = X^T X / n is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.5 * torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ M


def hessian(X):
    return X.T @ X / X.shape[0]


def check_row_bounds(W, q, s, bits):
    """Inside the clip range the error is at most s/2; outside it the code is +-R."""
    R, sf = clip_range(bits), s.float()[:, None]
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (W.shape[0],)
    assert int(q.abs().max()) <= R
    inside = W.abs() <= R * sf
    err = (W - q.float() * sf).abs()
    assert bool((err[inside] <= sf.expand_as(W)[inside] * (0.5 + 1e-4)).all())
    assert bool((q[~inside].abs() == R).all())
    assert bool((torch.sign(q[~inside]) == torch.sign(W[~inside])).all())


@pytest.mark.parametrize("make", [lambda: torch.randn(96, 64), lambda: trained_like(96, 64)])
@pytest.mark.parametrize("bits,sigma", [(6, 3.0), (6, 12.85), (7, 14.0), (4, 2.0)])
def test_rtn_row_error_bounds(make, bits, sigma):
    W = make()
    q, s = rtn_quantize(W, bits, sigma)
    check_row_bounds(W, q, s, bits)
    assert torch.equal(s, sdclip_scale(W, bits, sigma))
    expected = (sigma * W.std(dim=1) / clip_range(bits)).to(torch.float16)
    assert torch.equal(s, expected)


def test_sdclip_rejects_single_column():
    with pytest.raises(ValueError, match="2\\+ values"):
        rtn_quantize(torch.randn(5, 1), 6, 12.0)


def test_gptq_with_identity_hessian_is_rtn():
    # with H = I there is no cross-column error to propagate: GPTQ must reduce to rounding
    W = trained_like(80, 64)
    q, s = gptq_quantize(W, torch.eye(64), 6, 3.0)
    q_rtn, s_rtn = rtn_quantize(W, 6, 3.0)
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)
    check_row_bounds(W, q, s, 6)


@pytest.mark.parametrize("bits,sigma", [(6, 12.85), (4, 4.0)])
@pytest.mark.parametrize("heavy", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, sigma, heavy):
    W = trained_like(128, 96) if heavy else torch.randn(128, 96) * 0.02
    X = correlated_inputs(4096, 96)
    q, s = gptq_quantize(W, hessian(X), bits, sigma, block_size=32)
    q_r, s_r = rtn_quantize(W, bits, sigma)
    assert torch.equal(s, s_r) and int(q.abs().max()) <= clip_range(bits)
    out_err = lambda q, s: (X @ (W - q.float() * s.float()[:, None]).T).norm()
    assert out_err(q, s) < 0.8 * out_err(q_r, s_r)


def test_gptq_block_size_independent_of_block_boundaries():
    # blocks are only a schedule for the same updates: results agree up to float rounding
    W, X = torch.randn(64, 96) * 0.02, correlated_inputs(2048, 96, seed=1)
    q1, _ = gptq_quantize(W, hessian(X), 6, 12.85, block_size=32)
    q2, _ = gptq_quantize(W, hessian(X), 6, 12.85, block_size=128)
    assert (q1 != q2).float().mean() < 0.01


def test_gptq_dead_columns_and_zero_rows():
    W = torch.randn(48, 64)
    W[5] = 0.0
    X = correlated_inputs(1024, 64)
    X[:, [3, 17]] = 0.0  # inputs that never fire
    q, s = gptq_quantize(W, hessian(X), 6, 12.85)
    assert bool((q[:, [3, 17]] == 0).all()) and bool((q[5] == 0).all())
    assert float(s[5]) == pytest.approx(FP16_TINY) and bool(torch.isfinite(s.float()).all())


def test_indefinite_hessian_gets_more_damping_then_rtn():
    torch.manual_seed(0)
    W = {"blocks.0.mlp.proj.weight": torch.randn(32, 64) * 0.02}
    X = torch.randn(16, 64)  # fewer samples than columns: X^T X is singular
    A = hessian(X)
    # eigenvalues down to -0.05 mean(diag): damping 0.01 is not enough, 0.1 is
    H = A - 0.05 * A.diagonal().mean() * torch.eye(64)
    lines = []
    qstate = quantize_state_dict(W, {"blocks.0.mlp.proj.weight": H}, config(), log=lines.append)
    assert lines == ["gptq (int6, damp 0.1)+lqer_asym: blocks.0.mlp.proj.weight"]
    for bad in (-torch.eye(64), torch.full((64, 64), float("nan"))):
        lines = []
        h = config(lqer_enabled=False)
        qstate = quantize_state_dict(W, {"blocks.0.mlp.proj.weight": bad}, h, log=lines.append)
        assert lines == ["rtn (int6, hessian unusable): blocks.0.mlp.proj.weight"]
        q_rtn, _ = rtn_quantize(W["blocks.0.mlp.proj.weight"], 6, 11.5)
        assert torch.equal(qstate["blocks.0.mlp.proj.weight"]["q"], q_rtn)


def test_quantize_groups_asym_ranges():
    x = torch.randn(4, 128)
    q, s = quantize_groups(x, 64, -8, 7, 7.5)
    assert s.shape == (8,) and int(q.min()) >= -8 and int(q.max()) <= 7
    err = (x - dequantize_groups(q, s)).reshape(8, 64).abs()
    # +7.5 s clamps to 7: half a step, plus the fp16 rounding of s
    assert bool((err <= s.float()[:, None] * 0.51).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_quantize_groups_property(rows, groups, seed):
    x = torch.randn(rows, groups * 16, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_groups(x, 16, -127, 127, 127.0)
    err = (x - dequantize_groups(q, s)).reshape(-1, 16).abs()
    assert bool((err <= s.float()[:, None] * 0.5 + 1e-6).all())


def test_lqer_asym_format_and_gain():
    W = trained_like(256, 64)
    q, s = rtn_quantize(W, 6, 12.85)
    E = W - q.float() * s.float()[:, None]
    f = lqer_factors(E, 4, 64)
    assert f["lqer_qa"].shape == (256, 4) and f["lqer_sa"].shape == (1,)
    assert int(f["lqer_qa"].min()) >= -2 and int(f["lqer_qa"].max()) <= 1
    assert f["lqer_qb"].shape == (4, 64) and f["lqer_sb"].shape == (4,)
    assert int(f["lqer_qb"].min()) >= -8 and int(f["lqer_qb"].max()) <= 7
    assert all(v.dtype == torch.float16 for k, v in f.items() if k.endswith(("sa", "sb")))
    assert (E - lqer_reconstruct(f)).norm() < E.norm()


def test_lqer_factor_that_does_not_split_into_groups_is_refused():
    """The symmetric fallback is gone (issue 16): the config refuses a group that does not divide
    LQER_RANK x MODEL_DIM, and lqer_factors refuses a B that does not split."""
    E = torch.randn(50, 40) * 1e-3 + torch.randn(50, 2) @ torch.randn(2, 40) * 1e-2
    with pytest.raises(ValueError, match="LQER_ASYM_GROUP=64"):
        lqer_factors(E, 4, 64)  # 4 * 40 = 160 is not a multiple of 64
    with pytest.raises(ValueError, match="LQER_ASYM_GROUP=48"):
        tg.load_config({"LQER_ASYM_GROUP": "48"})  # 4 * 512 = 2048 is not a multiple of 48
    assert tg.load_config({"LQER_ASYM_GROUP": "48", "LQER_ENABLED": "0"}).lqer_asym_group == 48
    assert tg.load_config({"LQER_ASYM_GROUP": "32", "LQER_RANK": "2"}).lqer_asym_group == 32


@pytest.mark.parametrize("env", [{}, {"SMOKE": "1"}, {"ATTN_GATE": "dense"}])
def test_every_tensor_of_the_model_has_a_quantization_rule(env):
    """No tensor of the model falls outside embed/attn/mlp GPTQ, the int8 gate rows and the fp16
    passthrough (the `matrix` class and MATRIX_CLIP_SIGMAS were unreachable and are gone); a
    large tensor outside those names is an error, not a silent class."""
    h = tg.load_config(env)
    sd = tg.GPT(h, 1, "sdpa").state_dict()
    classes = {tg.tensor_class(n, t) for n, t in sd.items()}
    assert {"embed", "attn", "mlp"} <= classes <= {"embed", "attn", "mlp", "gate", "fp16"}
    with pytest.raises(ValueError, match="big_other.weight: no quantization rule"):
        tg.tensor_class("big_other.weight", torch.zeros(300, 256))
    with pytest.raises(ValueError, match="MATRIX_CLIP_SIGMAS"):
        tg.load_config({"MATRIX_CLIP_SIGMAS": "12.85"})


def toy_state_dict(d=64, layers=2, kv=32, vocab=256, heads=4, seed=0):
    torch.manual_seed(seed)
    sd = {"tok_emb.weight": trained_like(vocab, d, seed)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = trained_like(d, d, seed + 10 * i + 1)
        sd[p + "attn.c_k.weight"] = trained_like(kv, d, seed + 10 * i + 2)
        sd[p + "attn.c_v.weight"] = trained_like(kv, d, seed + 10 * i + 3)
        sd[p + "attn.proj.weight"] = trained_like(d, d, seed + 10 * i + 4)
        sd[p + "mlp.fc.weight"] = trained_like(4 * d, d, seed + 10 * i + 5)
        sd[p + "mlp.proj.weight"] = trained_like(d, 4 * d, seed + 10 * i + 6)
        sd[p + "attn.attn_gate_w"] = torch.randn(heads, 12)
        sd[p + "attn.q_gain"] = torch.full((heads,), 5.0) + torch.randn(heads)
        sd[p + "attn_scale"] = torch.rand(d)
        sd[p + "resid_mix"] = torch.randn(2, d)
    sd["skip_weights"] = torch.randn(layers // 2, d)
    sd["step_counter"] = torch.tensor([7, 8], dtype=torch.int64)
    return sd


def toy_hessians(sd, skip=()):
    out = {}
    for name, t in sd.items():
        gate = name.endswith("gate_w")
        if t.ndim == 2 and name not in skip and t.is_floating_point() and not gate:
            out[name] = hessian(correlated_inputs(512, t.shape[1], seed=t.shape[1]))
    return out


def lqer_names(qstate):
    return [n for n, e in qstate.items() if "lqer_qa" in e]


def sq_error(sd, qstate, lqer=True):
    """Sum of ||W - W_hat||^2 over the GPTQ'd matrices; lqer=False: without their LQER factors."""
    strip = lambda e: e if lqer else {k: v for k, v in e.items() if not k.startswith("lqer_")}  # noqa: E731
    return sum((sd[n] - dequantize_entry(strip(e))).pow(2).sum().item()
               for n, e in qstate.items() if e["kind"] == "rows" and e["bits"] < 8)


@pytest.fixture(scope="module")
def quantized():
    sd = toy_state_dict()
    hessians = toy_hessians(sd, skip=("blocks.1.attn.c_v.weight",))
    lines = []
    qstate = quantize_state_dict(sd, hessians, config(), log=lines.append)
    return sd, qstate, lines


def test_state_dict_classes_and_log(quantized):
    sd, qstate, lines = quantized
    assert qstate["tok_emb.weight"]["bits"] == 7 and qstate["blocks.0.mlp.fc.weight"]["bits"] == 6
    assert qstate["blocks.0.attn.attn_gate_w"]["bits"] == 8
    assert qstate["skip_weights"]["kind"] == "fp16" and qstate["step_counter"]["kind"] == "raw"
    logged = [n for line in lines for n in line.split(": ", 1)[1].split(", ")]
    assert sorted(logged) == sorted(sd)  # every tensor named exactly once
    rtn_line = "rtn (int6, no hessian): blocks.1.attn.c_v.weight"
    assert any(line.startswith(rtn_line) for line in lines)
    assert any("+lqer_asym" in line for line in lines)
    assert len(lqer_names(qstate)) == 3
    weight_sq = sum(sd[n].pow(2).sum().item() for n, e in qstate.items() if e["kind"] == "rows" and e["bits"] < 8)
    assert sq_error(sd, qstate) < sq_error(sd, qstate, lqer=False) < 0.1 * weight_sq


def test_fit_to_cap_raises_mlp_sigma_until_the_blob_fits():
    """A budget 3% under the default size is met by requantizing with a larger MLP clip sigma;
    with FIT_TO_CAP off the oversized blob comes back unchanged (the run then fails at the cap)."""
    sd = toy_state_dict(d=128)
    hess, quiet, timer = toy_hessians(sd), (lambda *a: None), Timer(torch.device("cpu"))
    h = config(fit_to_cap=True)
    base, k0 = quantize_fit(sd, hess, h, 10**9, quiet, timer)
    assert k0 == 11.5 and timer.phases["gptq_quantize"] > 0 and timer.phases["serialize"] > 0
    budget, lines = int(len(base) * 0.97), []
    blob, k = quantize_fit(sd, hess, h, budget, lines.append, timer)
    assert len(blob) <= budget and k > 11.5 and h.mlp_clip_sigmas == 11.5  # caller's h untouched
    assert any(line.startswith("fit_to_cap:") for line in lines)
    assert deserialize(blob).keys() == sd.keys()
    same, k1 = quantize_fit(sd, hess, config(fit_to_cap=False), budget, quiet, timer)
    assert same == base and k1 == 11.5


def test_fit_to_cap_sigma_search_is_bounded_and_says_why():
    """Code alone over the cap once drove MLP_CLIP_SIGMAS 11.5 -> 106,384 -> 6.8e7 -> 4.0e10: the
    search stops at FIT_MAX_SIGMA_RATIO x the configured sigma and logs why."""
    sd = toy_state_dict()
    hess, timer, lines = toy_hessians(sd), Timer(torch.device("cpu")), []
    blob, k = quantize_fit(sd, hess, config(fit_to_cap=True), -10**6, lines.append, timer)
    fit = [line for line in lines if line.startswith("fit_to_cap")]
    assert k == 2 * 11.5 and len(fit) == 2 and deserialize(blob).keys() == sd.keys()
    assert "-> 23.000" in fit[0] and fit[1].startswith("fit_to_cap: stopped (MLP_CLIP_SIGMAS reached its bound")


def test_code_over_the_cap_is_refused_before_training(smoke_dir, monkeypatch):
    import train_gpt as tg

    monkeypatch.setattr(tg, "ARTIFACT_CAP", 1000)  # the running file is far over it
    monkeypatch.setattr(tg, "init_distributed", lambda h: pytest.fail("setup reached init_distributed"))
    h = tg.load_config({"SMOKE": "1", "DATA_PATH": smoke_dir,
                        "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model")})
    with pytest.raises(ValueError, match="leaves no room for the model under the 1000 B cap"):
        tg.setup(h)


def test_lqer_picks_largest_errors(quantized):
    sd, qstate, _ = quantized
    plain = {n: e for n, e in qstate.items() if e["kind"] == "rows" and e["bits"] < 8}
    errs = {n: (sd[n] - dequantize_groups(e["q"], e["s"])).norm().item() for n, e in plain.items()}
    assert set(lqer_names(qstate)) == set(sorted(errs, key=errs.get, reverse=True)[:3])
    for n in lqer_names(qstate):
        deq = dequantize_state_dict({n: qstate[n]})[n]
        assert (sd[n] - deq).norm().item() < errs[n]


def test_dequantize_keys_shapes_dtypes_and_passthrough(quantized):
    sd, qstate, _ = quantized
    deq = dequantize_state_dict(qstate)
    assert list(deq) == list(sd)
    for name, t in sd.items():
        assert deq[name].shape == t.shape and deq[name].dtype == t.dtype, name
    for name in ("skip_weights", "blocks.0.attn.q_gain", "blocks.1.resid_mix"):
        assert torch.equal(deq[name], sd[name].half().float())
    assert torch.equal(deq["step_counter"], sd["step_counter"])
    gate, e = sd["blocks.0.attn.attn_gate_w"], qstate["blocks.0.attn.attn_gate_w"]
    s = gate.abs().amax(dim=1) / 127
    assert torch.equal(e["s"], s.half()) and bool((e["q"].abs().amax(dim=1) == 127).all())
    err = (gate - deq["blocks.0.attn.attn_gate_w"]).abs()
    assert bool((err <= e["s"].float()[:, None] / 2 + 1e-7).all())


def assert_same_qstate(a, b):
    assert list(a) == list(b)
    for name in a:
        assert set(a[name]) == set(b[name]), name
        for k, v in a[name].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == b[name][k].dtype and v.shape == b[name][k].shape, (name, k)
                bits = lambda t: t.reshape(-1).view(torch.uint8)
                assert torch.equal(bits(v), bits(b[name][k]))
            else:
                assert v == b[name][k], (name, k)


def test_serialize_roundtrip_and_determinism(quantized):
    _, qstate, _ = quantized
    blob = serialize(qstate, config())
    assert blob == serialize(qstate, config())
    back = deserialize(blob)
    assert_same_qstate(qstate, back)
    assert serialize(back, config()) == blob


def test_serialize_odd_tensors():
    qstate = {
        "scalar": {"kind": "fp16", "t": torch.tensor(1.5, dtype=torch.float16)},
        "empty": {"kind": "raw", "t": torch.zeros(0, 3, dtype=torch.int32)},
        "flags": {"kind": "raw", "t": torch.tensor([True, False, True])},
        "bf": {"kind": "raw", "t": torch.randn(5).bfloat16()},
    }
    assert_same_qstate(qstate, deserialize(serialize(qstate, config())))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(2, 9), st.sampled_from(["rows", "fp16"])),
                min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_serialize_roundtrip_property(specs, seed):
    g = torch.Generator().manual_seed(seed)
    qstate = {}
    for i, (r, c, kind) in enumerate(specs):
        x = torch.randn(r, c, generator=g)
        if kind == "rows":
            q, s = rtn_quantize(x, 6, 3.0)
            qstate[f"blocks.{i}.w"] = {"kind": "rows", "bits": 6, "q": q, "s": s}
        else:
            qstate[f"blocks.{i}.w"] = {"kind": "fp16", "t": x.half()}
    assert_same_qstate(qstate, deserialize(serialize(qstate, config())))


def test_deserialize_rejects_bad_headers(quantized):
    _, qstate, _ = quantized
    blob = serialize(qstate, config())
    with pytest.raises(ValueError, match="magic"):
        deserialize(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="version"):
        deserialize(blob[:4] + bytes([99]) + blob[5:])
    with pytest.raises(ValueError, match="compressor 0"):  # 1 was lzma, retired
        deserialize(blob[:5] + bytes([1]) + blob[6:])
    with pytest.raises(ValueError, match="checksum"):
        deserialize(blob[:6] + bytes([blob[6] ^ 1]) + blob[7:])


# ---- AWQ-lite (PR #1908) -----------------------------------------------------------------------


def salient_case(rows=96, cols=256, group=(128, 192)):
    """An MLP matrix whose inputs in one 64-column group have 8x the RMS of the rest."""
    X = correlated_inputs(4096, cols, seed=3)
    X[:, group[0]:group[1]] *= 8.0
    return {"blocks.0.mlp.fc.weight": trained_like(rows, cols, seed=4)}, hessian(X)


def hessian_error(W, What, H):
    E = (W - What).double()
    return torch.einsum("ri,ij,rj->", E, H.double(), E).item()


def test_awq_lite_keeps_the_salient_group_at_int8_and_lowers_the_hessian_error():
    sd, H = salient_case()
    name, W = next(iter(sd.items()))
    assert awq_groups(sd, {name: H}, config(awq_lite_groups=1)) == {name: [128]}
    lines = []
    plain = quantize_state_dict(sd, {name: H}, config(lqer_enabled=False), log=lines.append)
    awq = quantize_state_dict(sd, {name: H}, config(lqer_enabled=False, awq_lite_groups=1),
                              log=lines.append)
    e = awq[name]
    assert e["awq_cols"] == [128] and e["awq_group"] == 64 and lines[-1] == f"gptq (int6)+awq_int8: {name}"
    assert torch.equal(e["awq_s"], sdclip_scale(W, 8, 11.5)) and e["awq_s"].dtype == torch.float16
    rest = torch.cat([e["q"][:, :128], e["q"][:, 192:]], 1)
    assert int(e["q"][:, 128:192].abs().max()) > 31 >= int(rest.abs().max())
    before, after = (hessian_error(W, dequantize_entry(x[name]), H) for x in (plain, awq))
    assert after < 0.7 * before


def test_awq_lite_ranks_looped_layers_by_their_per_call_input():
    """A looped layer's Hessian sums its NUM_LOOPS + 1 passes (#1908 averages per call). Layer
    0's best group has diag(H) 5 per call; looped layer 4's has 3 per call, 9 summed over its 3
    passes. Per call layer 0 wins; reading the sum as one pass would pick layer 4."""
    W = trained_like(64, 128, seed=5)
    sd = {"blocks.0.mlp.fc.weight": W, "blocks.4.mlp.fc.weight": W.clone()}
    d0, d4 = torch.ones(128), torch.ones(128)
    d0[:64], d4[64:] = 5.0, 3.0
    hess = {"blocks.0.mlp.fc.weight": torch.diag(d0), "blocks.4.mlp.fc.weight": torch.diag(3 * d4)}
    loop = dict(awq_lite_groups=1, loop_start=3, loop_end=5)
    assert awq_groups(sd, hess, config(num_loops=2, **loop)) == {"blocks.0.mlp.fc.weight": [0]}
    # the same sums read as one pass per row (no loop): layer 4's summed H (RMS 3) wins instead
    assert awq_groups(sd, hess, config(num_loops=0, **loop)) == {"blocks.4.mlp.fc.weight": [64]}


def test_awq_lite_off_keeps_no_groups_and_on_round_trips_the_container():
    sd = toy_state_dict()
    hess = toy_hessians(sd)
    off = quantize_state_dict(sd, hess, config(), log=lambda *a: None)
    assert not any("awq_s" in e for e in off.values())
    qstate = quantize_state_dict(sd, hess, config(awq_lite_groups=3), log=lambda *a: None)
    picked = [n for n, e in qstate.items() if "awq_s" in e]
    assert 1 <= len(picked) <= 3 and sum(len(qstate[n]["awq_cols"]) for n in picked) == 3
    blob = serialize(qstate, config())
    back = deserialize(blob)
    assert_same_qstate(qstate, back)
    deq, again = dequantize_state_dict(qstate), dequantize_state_dict(back)
    assert all(torch.equal(deq[n], again[n]) for n in deq)
    assert len(blob) > len(serialize(off, config()))  # the int8 groups cost bytes...
    assert sq_error(sd, qstate, lqer=False) < sq_error(sd, off, lqer=False)  # ...and lower the GPTQ error


def test_fit_to_cap_absorbs_the_awq_lite_bytes():
    """With AWQ-lite on and the budget at the size of the blob without it, FIT_TO_CAP raises the
    MLP sigma until the AWQ-lite blob fits (its extra bytes are part of the measured blob)."""
    sd = toy_state_dict(d=128)
    hess, quiet, ledger = toy_hessians(sd), (lambda *a: None), Timer(torch.device("cpu"))
    budget = len(quantize_fit(sd, hess, config(fit_to_cap=True), 10**9, quiet, ledger)[0])
    h = config(fit_to_cap=True, awq_lite_groups=6)
    assert len(quantize_fit(sd, hess, h, 10**9, quiet, ledger)[0]) > budget
    blob, k = quantize_fit(sd, hess, h, budget, quiet, ledger)
    assert len(blob) <= budget and k > 11.5
    assert any("awq_s" in e for e in deserialize(blob).values())


def test_lqer_field_settings_rank2_group32_top4():
    """PR #2060's LQER_RANK=2, LQER_ASYM_GROUP=32, LQER_TOP_K=4: asymmetric groups of 32."""
    sd = toy_state_dict()
    h = config(lqer_rank=2, lqer_asym_group=32, lqer_top_k=4)
    qstate = quantize_state_dict(sd, toy_hessians(sd), h, log=lambda *a: None)
    assert len(lqer_names(qstate)) == 4 and sq_error(sd, qstate) < sq_error(sd, qstate, lqer=False)
    for n in lqer_names(qstate):
        e = qstate[n]
        assert e["lqer_qa"].shape[1] == 2 and e["lqer_sb"].numel() == e["lqer_qb"].numel() // 32
    assert_same_qstate(qstate, deserialize(serialize(qstate, h)))

