"""Evaluation of train_gpt.py on CPU: the legality self-test and its negative controls, coverage of
every eval, the LoRA path against a plain doc-isolated eval, the ledger checker, EVAL_ONLY, the
pre-quant research stamp, and TTT over 2 gloo ranks against 1."""
import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import legality
import train_gpt as tg
from conftest import free_port
from data.common import write_shard

CPU = legality.CPU


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny CPU ops: extra threads only add overhead (and crawl on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quiet(*a, **k):
    pass


def tiny(**over):
    return legality.tiny_config(**over)


# ---- legality self-test ----------------------------------------------------------------------


def test_legality_selftest_passes(capsys):
    assert legality.main([]) == 0
    assert "ALL PASS" in capsys.readouterr().out


@pytest.mark.parametrize("variant", [v for v in legality.VARIANTS if v != "none"])
def test_legality_selftest_catches_each_variant(variant, capsys):
    assert legality.main(["--variant", variant]) == 1
    out = capsys.readouterr().out
    assert "negative control works" in out, out
    assert "FAIL: " in out and legality.VARIANTS[variant] in out.split("FAIL: ")[-1]


# ---- coverage: every target exactly once -------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(2, 300), st.data())
def test_sliding_windows_tile_the_stream(n, length, data):
    stride = data.draw(st.integers(1, length - 1))
    ends, firsts = tg.sliding_windows(n, length, stride)
    covered = np.zeros(n, int)
    for e, f in zip(ends, firsts):
        covered[f:e] += 1
        assert e - length <= f or e <= length  # scored targets see >= length - stride context
        assert e - f <= (length if f == 0 else stride)
    assert (covered == 1).all()


def test_sliding_and_nonoverlapping_score_every_target_once():
    h, val = tiny(), legality.synthetic_val()
    model = legality.random_model(h)
    led = tg.ScoreLedger(val.num_targets, CPU.device)
    sliding = tg.eval_sliding(model, val, h, CPU, led, quiet)
    checks = tg.check_ledger(led, tg.find_docs(val.tokens, 1)[0])
    plain = tg.eval_val(model, val, h, CPU, tg.ScoreLedger(val.num_targets, CPU.device), quiet)
    for s in (sliding, plain):
        assert s.tokens == val.num_targets and s.bytes == int(val.target_bytes.sum())
        assert math.isfinite(s.bpb) and s.bpb > 0
    assert checks["C4"] and checks["scored"] == val.num_targets


def test_docs_tile_the_targets():
    val = legality.synthetic_val()
    starts, ends = tg.find_docs(val.tokens, 1)
    assert starts[0] == 0 and ends[-1] == val.num_targets and (starts[1:] == ends[:-1]).all()
    assert (val.tokens[torch.from_numpy(ends[:-1])] == 1).all()  # a doc's last target: next BOS
    no_bos_start = tg.find_docs(val.tokens[5:], 1)[0]
    assert no_bos_start[0] == 0  # a leading BOS-less span is a document too


def test_queue_and_phase_cuts():
    lengths = np.array([5, 50, 20, 70, 10, 60, 30, 40, 80])
    queue = tg.ttt_queue(lengths, 4)  # cut short-first, so the partial batch holds the longest
    assert [b.tolist() for b in queue] == [[8], [7, 1, 5, 3], [0, 4, 2, 6]]
    cuts = lambda p, k: tg.phase_cuts(queue, tiny(PHASED_TTT_PREFIX_DOCS=p, PHASED_TTT_NUM_PHASES=k))
    assert cuts(4, 2) == [(2, 2), (2, 4)]  # 1 + 4 docs scored covers both boundaries
    assert cuts(6, 2) == [(2, 3)]  # boundary 6 falls in the last batch: nothing left to help
    assert cuts(6, 0) == [] and cuts(0, 3) == []


# ---- the LoRA path --------------------------------------------------------------------------------


def plain_doc_eval(model, val, h) -> float:
    """Reference: each chunk of each doc scored with the same context window, no adapters."""
    starts, ends = tg.find_docs(val.tokens, 1)
    total = 0.0
    for s, e in zip(starts, ends):
        for cs in range(s, e, h.ttt_chunk_size):
            ce = min(cs + h.ttt_chunk_size, e)
            ws = max(s, ce - h.ttt_eval_seq_len)
            with torch.no_grad():
                nll = model(val.tokens[None, ws:ce], val.tokens[None, ws + 1:ce + 1])
            total += nll[0, cs - ws:].double().sum().item()
    return total


def test_ttt_bucket():
    assert [tg.ttt_bucket(n, 2048) for n in (1, 256, 257, 600, 1500, 2048)] == \
        [256, 256, 512, 1024, 2048, 2048]
    assert [tg.ttt_bucket(n, 256) for n in (1, 128, 129)] == [128, 128, 256]
    assert tg.ttt_bucket(5, 32) == 32
    assert [tg.ttt_bucket(n, 2560) for n in (1, 385, 641, 1281)] == [384, 640, 1280, 2560]  # flex: x128
    assert [tg.ttt_bucket(n, 3072) for n in (1, 385, 769, 1537)] == [384, 768, 1536, 3072]


def test_ttt_with_zero_lr_equals_plain_doc_eval():
    """B = 0 and no step means zero delta: the TTT machinery (windows, padding, two length
    buckets, phases, masks, sums) must reproduce the plain doc-isolated eval."""
    over = dict(TRAIN_SEQ_LEN=256, TTT_EVAL_SEQ_LEN=256, TTT_CHUNK_SIZE=32)
    h, val = tiny(TTT_LORA_LR=0, GLOBAL_TTT_LR=0, **over), legality.synthetic_val((300, 40, 90, 12, 130, 60))
    model = legality.random_model(h)
    score = tg.ttt_eval(model, val, h, CPU, tg.ScoreLedger(val.num_targets, CPU.device), quiet)
    assert score.tokens == val.num_targets
    assert score.nll == pytest.approx(plain_doc_eval(model, val, h), rel=1e-6)
    trained = tg.ttt_eval(legality.random_model(h), val, tiny(**over), CPU,
                          tg.ScoreLedger(val.num_targets, CPU.device), quiet)
    assert trained.nll != pytest.approx(score.nll, rel=1e-6)  # and with lr > 0 it does adapt


def test_lora_is_one_adapter_per_row_and_zero_b_is_identity():
    h = tiny()
    model, val = legality.random_model(h), legality.synthetic_val()
    lora = tg.new_lora(model, h, 2, CPU.device)
    lora.reset(0)
    x, y = val.tokens[None, :64].repeat(2, 1), val.tokens[None, 1:65].repeat(2, 1)
    base = model(x, y)
    assert torch.equal(model(x, y, lora.view(torch.float32)), base)
    with torch.no_grad():
        lora.head[1][1].normal_()  # only row 1's head adapter
    out = model(x, y, lora.view(torch.float32))
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])


@pytest.mark.parametrize("targets", ["k,o,mlp,head", "k,o", "mlp", "q,v", ""])
def test_lora_targets_build_only_those_adapters_and_start_at_the_base_model(targets):
    """Adapters left out of TTT_LORA_TARGETS do not exist (nothing zero is computed), and a fresh
    set (B = 0) scores exactly as the base model."""
    h = tiny(TTT_LORA_TARGETS=targets)
    model, val = legality.random_model(h), legality.synthetic_val()
    lora = tg.new_lora(model, h, 2, CPU.device)
    lora.reset(0)
    want = [t for t in targets.split(",") if t]
    assert all(set(layer) == set(want) - {"head"} for layer in lora.layers)
    assert (lora.head is not None) == ("head" in want)
    assert len(lora.pairs()) == len(lora.layers) * len(set(want) - {"head"}) + ("head" in want)
    x, y = val.tokens[None, :64].repeat(2, 1), val.tokens[None, 1:65].repeat(2, 1)
    assert torch.equal(model(x, y, lora.view(torch.float32)), model(x, y))


def test_ttt_without_adapters_equals_plain_doc_eval():
    """TTT_LORA_TARGETS="" leaves nothing to train per document: at any LoRA LR the TTT pass is
    the plain doc-isolated chunked eval (global SGD at LR 0 here)."""
    over = dict(TRAIN_SEQ_LEN=256, TTT_EVAL_SEQ_LEN=256, TTT_CHUNK_SIZE=32, GLOBAL_TTT_LR=0)
    h, val = tiny(TTT_LORA_TARGETS="", **over), legality.synthetic_val((300, 40, 90, 12, 130, 60))
    model = legality.random_model(h)
    led = tg.ScoreLedger(val.num_targets, CPU.device)
    score = tg.ttt_eval(model, val, h, CPU, led, quiet)
    assert score.nll == pytest.approx(plain_doc_eval(model, val, h), rel=1e-6)
    starts, ends = tg.find_docs(val.tokens, 1)
    pauses = tg.phase_cuts(tg.ttt_queue(ends - starts, h.ttt_batch_size), h)
    assert sum(k == "update" for k, _, _ in led.events) == len(pauses)  # no per-chunk steps


def test_local_lr_mult_scales_the_lora_lr():
    val = legality.synthetic_val()
    score = lambda **o: tg.ttt_eval(legality.random_model(tiny(**o)), val, tiny(**o), CPU,  # noqa: E731
                                    tg.ScoreLedger(val.num_targets, CPU.device), quiet).nll
    base = score(TTT_LORA_LR=0.002)
    assert score(TTT_LORA_LR=0.004, TTT_LOCAL_LR_MULT=0.5) == base
    assert score(TTT_LORA_LR=0.002, TTT_LOCAL_LR_MULT=0.5) != base


def test_chunk_schedule_picks_the_chunk_per_doc_length():
    h = tiny(TTT_CHUNK_SCHEDULE="2000:24, 256:8", TTT_CHUNK_SIZE=48, TTT_EVAL_SEQ_LEN=64)
    pick = lambda *targets: tg.batch_chunk(np.array(targets), h)  # noqa: E731
    assert [pick(255), pick(256), pick(1999), pick(2000), pick(5000)] == [8, 24, 24, 48, 48]
    assert pick(100, 300) == 24  # the batch's longest doc decides
    assert tg.batch_chunk(np.array([10]), tiny()) == tiny().ttt_chunk_size  # no schedule (default)
    # in a run: batches of <= 30, <= 60 and <= 90 targets (lengths 31, 61, 91) score 2, 4, 8 at a time
    h, val = tiny(TTT_CHUNK_SCHEDULE="31:2,61:4"), legality.synthetic_val()
    led = tg.ScoreLedger(val.num_targets, CPU.device)
    tg.ttt_eval(legality.random_model(h), val, h, CPU, led, quiet)
    starts, ends = tg.find_docs(val.tokens, 1)
    for doc, n in enumerate(ends - starts):
        rows = [r for k, _, rs in led.events if k == "score" for r in rs if r[0] == doc]
        sizes = {int(e - s) for _, s, e in rows}
        assert max(sizes) == (2 if n <= 30 else 4 if n <= 60 else 8), (doc, n, sizes)
    assert tg.check_ledger(led, starts)["C3"] and tg.check_ledger(led, starts)["C4"]


@pytest.mark.parametrize("over", [
    dict(TTT_LORA_TARGETS="k,o,mlp,head"), dict(TTT_LORA_TARGETS="k,o"), dict(TTT_LORA_TARGETS=""),
    dict(TTT_CHUNK_SCHEDULE="31:2,61:4"), dict(TTT_LOCAL_LR_MULT=0.8),
    dict(PHASED_TTT_NUM_PHASES=1, PHASED_TTT_PREFIX_DOCS=10, TTT_LORA_LR=8e-5, TTT_LOCAL_LR_MULT=0.8),
])
def test_ttt_options_keep_score_before_update_and_each_target_once(over):
    h, val = tiny(**over), legality.synthetic_val()
    led = tg.ScoreLedger(val.num_targets, CPU.device)
    score = tg.ttt_eval(legality.random_model(h), val, h, CPU, led, quiet)
    checks = tg.check_ledger(led, tg.find_docs(val.tokens, 1)[0])
    assert checks["C3"] and checks["C4"] and score.tokens == val.num_targets


@pytest.mark.parametrize("env,match", [
    (dict(TTT_LORA_TARGETS="k,qv"), "TTT_LORA_TARGETS"), (dict(TTT_CHUNK_SCHEDULE="256-8"), "TTT_CHUNK_SCHEDULE"),
    (dict(TTT_CHUNK_SCHEDULE="256:0"), "TTT_CHUNK_SCHEDULE"), (dict(TTT_CHUNK_SCHEDULE="9:999"), "TTT_CHUNK_SCHEDULE"),
    (dict(TTT_LOCAL_LR_MULT=-0.5), "TTT_LOCAL_LR_MULT"),
    (dict(AWQ_LITE_GROUPS=-1), "AWQ_LITE_GROUPS"), (dict(AWQ_LITE_GROUP_SIZE=0), "AWQ_LITE_GROUP_SIZE"),
])
def test_ttt_option_values_are_checked(env, match):
    with pytest.raises(ValueError, match=match):
        tiny(**env)


# ---- token n-gram tilt ------------------------------------------------------------------------


def reference_hints(tokens, starts, ends, order, threshold):
    """Plain-Python token channel: per document, counts of (last order-1 tokens -> next token)."""
    out = np.full(len(tokens) - 1, -1)
    for s, e in zip(starts, ends):
        counts = {}
        for i in range(s + order - 2, e):
            c = counts.setdefault(tuple(tokens[i - order + 2:i + 1]), dict(total=0, top=0, tok=-1, pairs={}))
            if c["total"] and c["top"] / c["total"] >= threshold:
                out[i] = c["tok"]
            nxt = int(tokens[i + 1])
            c["pairs"][nxt] = c["pairs"].get(nxt, 0) + 1
            c["total"] += 1
            if c["pairs"][nxt] > c["top"]:
                c["top"], c["tok"] = c["pairs"][nxt], nxt
    return out


@pytest.mark.parametrize("order,vocab", [(2, 6), (3, 4), (5, 3)])
def test_ngram_hints_match_a_plain_reference(order, vocab):
    g = np.random.default_rng(order)
    docs = [np.concatenate([[1], g.integers(2, 2 + vocab, n - 1)]) for n in g.integers(1, 60, 30)]
    toks = np.concatenate(docs)
    val = tg.ValData(torch.from_numpy(toks).long(), torch.ones(toks.size - 1, dtype=torch.long), 1)
    starts, ends = tg.find_docs(val.tokens, 1)
    got = tg.ngram_hints(val, starts, tiny(NGRAM_ORDER=order, NGRAM_THRESHOLD=0.6)).numpy()
    want = reference_hints(toks, starts, ends, order, 0.6)
    assert (want >= 0).sum() > 100 and np.array_equal(got, want)


@pytest.mark.parametrize("cap", [30.0, 7.0])
def test_ngram_tilt_is_a_renormalized_logit_boost(cap):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 20
    targets, hint = torch.randint(0, 11, (3, 5), generator=g), torch.randint(-1, 11, (3, 5), generator=g)
    hint[0, :3] = targets[0, :3]  # some hits
    z = cap * torch.tanh(logits / cap)
    nll = F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    boosted = z + 2.625 * F.one_hot(hint.clamp_min(0), 11) * (hint >= 0)[..., None]
    want = -torch.log_softmax(boosted, -1).gather(-1, targets[..., None])[..., 0]
    got = tg.softcap_nll(logits, torch.eye(11), targets, cap, None, hint, 2.625)
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got[hint < 0], nll[hint < 0])
    x = logits.clone().requires_grad_()
    tg.softcap_nll(x, torch.eye(11), targets, cap, None, hint, 2.625).sum().backward()
    ref = logits.clone().requires_grad_()
    tg.softcap_nll(ref, torch.eye(11), targets, cap).sum().backward()
    assert torch.equal(x.grad, ref.grad)  # TTT steps train on the model's own NLL


def test_ngram_tilt_moves_scores_and_boost_0_turns_it_off():
    val, tilt = legality.synthetic_val(), dict(NGRAM_BOOST=2.625, NGRAM_ORDER=2)
    scores = []
    for over in (dict(NGRAM_BOOST=0), tilt):
        h = tiny(**over)
        led = tg.ScoreLedger(val.num_targets, CPU.device)
        scores.append(tg.ttt_eval(legality.random_model(h), val, h, CPU, led, quiet))
        checks = tg.check_ledger(led, tg.find_docs(val.tokens, 1)[0])
        assert checks["C3"] and checks["C4"] and scores[-1].tokens == val.num_targets
    assert scores[0].nll != pytest.approx(scores[1].nll, rel=1e-6)
    with pytest.raises(ValueError, match="NGRAM_BOOST"):
        tiny(NGRAM_BOOST=-1)
    with pytest.raises(ValueError, match="NGRAM_BOOST"):
        tg.load_config({"TOKEN_BOOST": "2.625"})


# ---- ledger ------------------------------------------------------------------------------------


def ledger_verdict(events, n=20, starts=(0, 8)):
    led = tg.ScoreLedger(n, CPU.device)
    for kind, rows in events:
        led.record(kind, rows)
    return tg.check_ledger(led, np.array(starts))


def test_ledger_checker():
    ok = ledger_verdict([("score", [(0, 0, 4)]), ("update", [(0, 0, 4)]), ("score", [(0, 4, 8)]),
                         ("score", [(1, 8, 20)]), ("update", [(0, 0, 8), (1, 8, 12)])])
    assert ok["C3"] and ok["C4"] and ok["scored"] == 20
    early = ledger_verdict([("score", [(0, 0, 4)]), ("update", [(0, 0, 6)]),  # 4, 5 unscored
                            ("score", [(0, 4, 8), (1, 8, 20)])])
    assert not early["C3"] and early["late_updates"] == 1 and early["C4"]
    other_doc = ledger_verdict([("score", [(1, 8, 12)]), ("update", [(1, 8, 12)]),
                                ("score", [(0, 0, 8), (1, 12, 20)])])
    assert other_doc["C3"]  # doc 1 may train before doc 0 is scored: docs are independent
    twice = ledger_verdict([("score", [(0, 0, 8), (1, 8, 20)]), ("score", [(1, 10, 11)])])
    missing = ledger_verdict([("score", [(0, 0, 8), (1, 8, 19)])])
    assert not twice["C4"] and not missing["C4"] and twice["C3"]


def legality_of(events, h):
    """What evaluate() stamps on a pass that writes `events` to its ledger (20 targets, docs at 0, 8)."""
    tokens = torch.full((21,), 5)
    tokens[[0, 8]] = 1
    val = tg.ValData(tokens, torch.ones(20, dtype=torch.long), 1)

    def scoring(model, val, h, d, led, log):
        for kind, rows in events:
            led.record(kind, rows)
        return tg.Score(0.0, 0, 0)
    model = types.SimpleNamespace(trained_on_val=h.prequant_ttt_epochs > 0)  # as after prequant_ttt
    return tg.evaluate("eval_test", scoring, model, val, h, CPU, quiet, tg.Timer(CPU.device))[1]


def test_evaluate_stamps_what_failed():
    ok = [("score", [(0, 0, 8), (1, 8, 20)]), ("update", [(0, 0, 8)])]
    assert legality_of(ok, tiny()) == "compliant"
    assert legality_of(ok, tiny(PREQUANT_TTT_EPOCHS=1)) == "C3: pre-quant TTT trained on val before scoring"
    early = [("score", [(0, 0, 4)]), ("update", [(0, 0, 6)]), ("score", [(0, 4, 8), (1, 8, 20)])]
    assert legality_of(early, tiny()) == "C3: 1 optimizer steps used tokens before they were scored"
    assert legality_of([("score", [(0, 0, 8), (1, 8, 19)])], tiny()).startswith("C4: 19 scores for 20")


# ---- entry points -------------------------------------------------------------------------------


def test_final_evaluation_stamps_prequant_ttt():
    h, val = tiny(PREQUANT_TTT_EPOCHS=1, SLIDING_ENABLED=0), legality.synthetic_val()
    model, timer = legality.random_model(h), tg.Timer(CPU.device, 600.0)
    tg.prequant_ttt(model, val, h, CPU, quiet)
    out = tg.final_evaluation(model, val, h, CPU, quiet, timer)
    assert out["legality"] == "C3: pre-quant TTT trained on val before scoring"
    assert "mode" not in out and out["scored_by"] == "eval_ttt"  # mode stays train; legality says it
    assert out["tokens_scored"] == val.num_targets and out["val_bpb_sliding"] is None
    assert out["eval_strict_s"] >= out["eval_time_s"] > 0


def test_only_evals_after_prequant_ttt_are_marked_as_trained_on_val():
    """In a PREQUANT_TTT_EPOCHS run the raw-weights eval comes before prequant_ttt: its ledger has
    no update; every eval after it fails C3."""
    h, val = tiny(PREQUANT_TTT_EPOCHS=1), legality.synthetic_val()
    model, timer = legality.random_model(h), tg.Timer(CPU.device)
    assert tg.evaluate("eval_raw", tg.eval_val, model, val, h, CPU, quiet, timer)[1] == "compliant"
    tg.prequant_ttt(model, val, h, CPU, quiet)
    verdict = tg.evaluate("eval_prequant", tg.eval_val, model, val, h, CPU, quiet, timer)[1]
    assert verdict == "C3: pre-quant TTT trained on val before scoring"


def fake_data_dir(root, val: tg.ValData):
    """Shards, a byte sidecar and a manifest: what load_data_spec checks, nothing more."""
    os.makedirs(root)
    tok = os.path.join(root, "tok.model")
    open(tok, "wb").write(b"not a real tokenizer: sidecar data never loads it")
    train = write_shard(os.path.join(root, "fineweb_train_000000.bin"), val.tokens.numpy())
    shard = write_shard(os.path.join(root, "fineweb_val_000000.bin"), val.tokens.numpy())
    side = write_shard(os.path.join(root, "fineweb_val_bytes_000000.bin"), [0] + val.target_bytes.tolist())
    manifest = dict(format_version=1, variant="test", byte_source="sidecar", train=dict(shards=[train]),
                    tokenizer=dict(sha256=tg.sha256_file(tok), vocab_size=legality.VOCAB, bos_id=1),
                    val=dict(tokens=val.tokens.numel(), shards=[shard], byte_shards=[side]))
    json.dump(manifest, open(os.path.join(root, "manifest.json"), "w"))
    return tok


def test_eval_only_scores_a_saved_artifact(tmp_path, monkeypatch):
    h, val = tiny(), legality.synthetic_val()
    model = legality.random_model(h)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    qstate = tg.quantize_state_dict(sd, {}, h, log=lambda *a: None)  # no Hessians: rounding
    (tmp_path / "model.pt").write_bytes(tg.serialize(qstate, h, tg.artifact_meta(h, "fake")))
    model.load_state_dict(tg.dequantize_state_dict(qstate))  # what the artifact encodes
    tok = fake_data_dir(str(tmp_path / "data"), val)
    env = {k: str(v) for k, v in legality.TINY.items()}
    env.update(DATA_PATH=str(tmp_path / "data"), TOKENIZER_PATH=tok, RUN_ID="evalonly",
               EVAL_ONLY=str(tmp_path / "model.pt"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    tg.main()
    line = [s for s in open(tmp_path / "logs/evalonly.txt") if s.startswith("final_json ")][-1]
    final = json.loads(line[len("final_json "):])
    assert final["mode"] == "eval_only" and final["legality"] == "compliant"
    assert final["artifact_config_hash"] == h.config_hash("fake") and not final["record_eligible"]
    assert final["tokens_scored"] == val.num_targets and final["scored_by"] == "eval_ttt"
    plain = tg.eval_val(model, val, h, CPU, tg.ScoreLedger(val.num_targets, CPU.device), quiet)  # saved weights
    assert final["val_bpb_diagnostic"] == pytest.approx(plain.bpb, rel=1e-6)
    assert {"load", "eval_warmup", "eval_sliding", "eval_ttt"} <= set(final["timings"])


def test_precompiled_eval_graphs_serve_a_fresh_model():
    """main() compiles the eval graphs on the training model before training; the model built
    from the artifact (a new instance) must reuse them all: its eval warmup compiles nothing.
    Also guards the warmup order that torch 2.13 needs (global SGD before LoRA TTT)."""
    h, d = tg.load_config({"SMOKE": "1"}), CPU
    torch._dynamo.reset()
    trained = tg.GPT(h, 1, "sdpa")
    tg.compile_model(trained)
    tg.precompile_eval(trained, h, d, 1)
    assert not trained.looping and all(p.requires_grad for p in trained.parameters())
    before = tg.compiled_graphs()
    fresh = tg.GPT(h, 1, "sdpa")
    fresh.load_state_dict(trained.state_dict())
    tg.compile_model(fresh)
    tg.scoring_state(fresh, h)
    tg.eval_warmup(fresh, h, d, 1)
    assert before > 10 and tg.compiled_graphs() == before
    torch._dynamo.reset()


def test_old_eval_names_point_at_their_replacement():  # the defaults: test_config_defaults_are_the_record
    for old, new in (("SLIDING_WINDOW_ENABLED", "SLIDING_ENABLED"), ("TTT_EVAL_ONLY", "EVAL_ONLY"),
                     ("TTT_K_LORA", "TTT_LORA_TARGETS"), ("TTT_MASK", "k,o,mlp,head"),
                     ("TTT_SHORT_SCORE_FIRST_STEPS", "TTT_CHUNK_SCHEDULE"),
                     ("PREQUANT_TTT_FREEZE_BLOCKS", "unknown")):
        with pytest.raises(ValueError, match=new):
            tg.load_config({old: "1"})


# ---- two gloo ranks --------------------------------------------------------------------------


def rank_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = ttt_once(tg.Dist(rank, world, 0, torch.device("cpu")))
    json.dump(result, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def ttt_once(d):
    """Phased TTT with A redrawn per batch (warm-started A depends on which rank ran the
    previous batch, as in the records); returns the global score and this rank's share. The LoRA
    LR is a sane one: the tool's 0.05 makes Adam chaotic enough to blow the float-level
    differences of a 2-rank gradient sum up to visible ones."""
    h, val = tiny(TTT_WARM_START_A=0, TTT_LORA_LR=0.002, TTT_BATCH_SIZE=2), legality.synthetic_val()
    led = tg.ScoreLedger(val.num_targets, d.device)
    score = tg.ttt_eval(legality.random_model(h), val, h, d, led, quiet)
    checks = tg.check_ledger(led, tg.find_docs(val.tokens, 1)[0])
    mine = sum(int((r[:, 2] - r[:, 1]).sum()) for k, _, r in led.events if k == "score")
    return dict(nll=score.nll, tokens=score.tokens, mine=mine, C3=checks["C3"], C4=checks["C4"])


@pytest.mark.parametrize("world", [2, 8])
def test_gloo_ranks_match_one(world, tmp_path):
    """TTT work sharing goes through the process group (no files): 2 or 8 ranks give 1 rank's score."""
    one = ttt_once(CPU)
    mp.spawn(rank_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    for r in ranks:
        assert r["nll"] == pytest.approx(one["nll"], rel=1e-5) and r["tokens"] == one["tokens"]
        assert r["C3"] and r["C4"] and r["mine"] < one["tokens"]
    assert sum(r["mine"] > 0 for r in ranks) >= 2  # the work was shared
    assert sum(r["mine"] for r in ranks) == one["tokens"]


def test_bench_tilt_hints_counts_what_the_plain_reference_counts(smoke_dir):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "tilt_hints.py")
    spec = importlib.util.spec_from_file_location("tilt_hints", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok = os.path.join(smoke_dir, "smoke_caseops_1024.model")
    env = {"DATA_PATH": smoke_dir, "TOKENIZER_PATH": tok, "VOCAB_SIZE": "1024"}
    lines = mod.main(env)
    h = tg.load_config(env)
    val = tg.load_val_data(tg.load_data_spec(h), h)
    toks = val.tokens.numpy()
    starts, ends = tg.find_docs(val.tokens, val.bos_id)
    want = reference_hints(toks, starts, ends, 8, 0.8)  # the second setting of the script
    hits = int(((want >= 0) & (want == toks[1:])).sum())
    assert len(lines) == 4 and f"hinted {int((want >= 0).sum())} of {val.num_targets} targets, hits {hits} " in lines[1]
