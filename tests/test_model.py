"""Model invariants of train_gpt.py on CPU: shapes, identity at init, loop order, lanes, and the
two leaks records shipped (SmearGate across BOS, attention across documents)."""
import math
import types

import pytest
import torch

import legality
import train_gpt as tg

BOS = 1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny CPU ops: extra threads only add overhead (and crawl on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**over):
    env = {"SMOKE": "1", "VOCAB_SIZE": "128", **{k: str(v) for k, v in over.items()}}
    return tg.load_config(env)


def randomized(h, backend="sdpa", seed=0):
    """A model whose every parameter is random, so zero-init gates cannot hide a leak."""
    torch.manual_seed(seed)
    model = tg.GPT(h, BOS, backend)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def docs_batch(T=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(4, 128, (2, T), generator=g)
    idx[:, 0] = BOS
    idx[0, 100 % T], idx[1, 37], idx[1, 200 % T] = BOS, BOS, BOS
    return idx


def test_forward_shapes_and_initial_loss():
    h = tiny()
    model = tg.GPT(h, BOS, "sdpa")
    idx = docs_batch()
    nll = model(idx, torch.roll(idx, -1, 1))
    assert nll.shape == idx.shape and nll.dtype == torch.float32
    # zero-init output projections + tiny embeddings: the initial prediction is ~uniform
    assert abs(nll.mean().item() - math.log(h.vocab_size)) < 0.05


def test_blocks_are_identity_at_init():
    h = tiny(ATTN_GATE="out")
    model = tg.GPT(h, BOS, "sdpa")
    x = torch.randn(2, 128, h.model_dim)
    seg = tg.segment_ids(docs_batch(128), BOS, h.train_seq_len)
    cos, sin = model.rope(128, x.device)
    for block in model.blocks:
        if not block.parallel:
            y, _ = block(x, None, torch.randn_like(x), seg, cos, sin, "sdpa")
            assert torch.equal(y, x)
    n = torch.randn(2, 16, h.model_dim)
    y = torch.randn(2, 16, h.num_heads, h.head_dim)
    assert torch.equal(model.blocks[0].attn.gate(y, n), y)  # AttnOutGate: 2*sigmoid(0) = 1
    e = model.tok_emb(docs_batch(64))
    assert torch.allclose(model.embed(docs_batch(64)), tg.rms_norm(e))  # SmearGate: lambda = 0


def test_sparse_gate_is_half_at_init():
    h = tiny(ATTN_GATE="sparse")
    attn = tg.GPT(h, BOS, "sdpa").blocks[0].attn
    y, n = torch.randn(1, 4, h.num_heads, h.head_dim), torch.randn(1, 4, h.model_dim)
    assert torch.allclose(attn.gate(y, n), 0.5 * y)


def test_recurrence_order():
    h = tg.load_config({})
    model = tg.GPT.__new__(tg.GPT)
    model.h = h
    assert model.layer_order(False) == list(range(11))
    assert model.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]


def test_parallel_lanes_follow_the_equations():
    h = tiny()
    block = randomized(h).blocks[h.parallel_start_layer]
    assert block.parallel
    T = 128
    x, lane1, x0 = (torch.randn(1, T, h.model_dim) for _ in range(3))
    seg = tg.segment_ids(torch.full((1, T), 5), BOS, h.train_seq_len)
    cos, sin = tg.GPT(h, BOS, "sdpa").rope(T, x.device)
    out0, out1 = block(x, lane1, x0, seg, cos, sin, "sdpa")
    s = block.ln_scale
    one = torch.ones(h.model_dim)  # the output scales are folded into proj; apply them outside here
    a = block.attn_scale * block.attn(tg.rms_norm(block.resid_mix[0] * x + block.resid_mix[1] * x0) * s,
                                      seg, cos, sin, "sdpa", one)
    m = block.mlp_scale * block.mlp(tg.rms_norm(lane1) * s, one)
    r, p = block.lane_resid, block.lane_post
    assert torch.allclose(out0, r[0] * x + p[0, 0] * a + p[1, 0] * m, atol=1e-5)
    assert torch.allclose(out1, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("looping", [False, True])
def test_no_information_crosses_a_bos(backend, looping):
    """Perturb the last token of doc N: nothing at or after the next BOS may change."""
    h = tiny()
    model = randomized(h, backend).requires_grad_(False)  # CPU flex has no backward
    model.looping = looping
    idx = docs_batch()
    y = torch.roll(idx, -1, 1)
    base = model(idx, y)
    for row, bos in ((0, 100), (1, 37), (1, 200)):
        pert = idx.clone()
        pert[row, bos - 1] = (pert[row, bos - 1] + 7) % 120 + 4
        out = model(pert, y)
        assert torch.equal(out[row, bos:], base[row, bos:]), f"leak across BOS at {row},{bos}"
        assert not torch.equal(out[row, :bos], base[row, :bos])  # the perturbation does act
    pert = idx.clone()
    pert[0, 50] += 1
    assert torch.equal(model(pert, y)[1], base[1])  # rows never see each other


def test_smear_gate_without_bos_fix_would_leak():
    """The same check fails if the BOS mask is removed: the test has teeth."""
    h = tiny()
    model = randomized(h)
    model.bos_id = -1  # no token is treated as BOS by the smear mask (nor by attention)
    idx = docs_batch()
    y = torch.roll(idx, -1, 1)
    pert = idx.clone()
    pert[0, 99] = (pert[0, 99] + 7) % 120 + 4
    assert not torch.equal(model(pert, y)[0, 100:], model(idx, y)[0, 100:])


def test_causality_within_a_document():
    h = tiny()
    model = randomized(h)
    idx = docs_batch()
    y = torch.roll(idx, -1, 1)
    base = model(idx, y)
    pert = idx.clone()
    pert[0, 60] = (pert[0, 60] + 3) % 120 + 4
    out = model(pert, y)
    assert torch.equal(out[0, :60], base[0, :60])


def test_segments_cut_long_documents():
    idx = torch.full((1, 20), 9)
    idx[0, 0], idx[0, 13] = BOS, BOS
    seg = tg.segment_ids(idx, BOS, 5)
    assert seg[0].tolist() == [1] * 5 + [2] * 5 + [3] * 3 + [4] * 5 + [5] * 2


def test_varlen_cu_seqlens_matches_segments():
    idx = docs_batch(256)
    seg = tg.segment_ids(idx, BOS, 64)
    cu = tg.varlen_cu_seqlens(seg, bucket=16)
    assert cu.numel() % 16 == 0
    flat = (seg + 256 * torch.arange(2)[:, None]).flatten()
    lengths = torch.unique_consecutive(flat, return_counts=True)[1]
    expect = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    assert torch.equal(cu[:expect.numel()].long(), expect)
    assert (cu[expect.numel():] == 512).all()


def test_flex_block_mask_matches_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    for seed, rate, max_len in ((0, 1 / 30, 512), (1, 1 / 300, 2048), (2, 1 / 3000, 256)):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(4, 100, (3, 1024), generator=g)
        idx[torch.rand(idx.shape, generator=g) < rate] = BOS
        seg = tg.segment_ids(idx, BOS, max_len)
        ref = create_block_mask(lambda b, h, q, k: (seg[b, q] == seg[b, k]) & (q >= k),
                                3, None, 1024, 1024, device="cpu")
        bm = tg.flex_doc_mask(seg)
        assert torch.equal(bm.to_dense(), ref.to_dense())
        assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)


@pytest.fixture(scope="module")
def reference_kernel_ops():
    """CPU stand-ins for the Triton ops (same signatures, plain math: the kernels' own formulas,
    not autograd), so the autograd wiring of FusedMLP and SoftcapCE is checked here; the kernels
    themselves are in tests/test_gpu.py."""
    if tg.triton is not None:
        pytest.skip("Triton present: the real ops are registered and tested in tests/test_gpu.py")
    F = torch.nn.functional

    @torch.library.custom_op("pgolf::mlp_up", mutates_args=())
    def mlp_up(x: torch.Tensor, w1: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x @ w1.T
        return pre, F.leaky_relu(pre, slope).square()

    @torch.library.custom_op("pgolf::mlp_up_grad", mutates_args=())
    def mlp_up_grad(g: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, slope: float) -> torch.Tensor:
        return (g @ w2) * torch.where(pre > 0, 2 * pre, 2 * slope * slope * pre)  # d/du (slope u)^2

    @torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
    def softcap_ce(x: torch.Tensor, tgt: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = softcap * torch.tanh(x / softcap)
        lse = torch.logsumexp(z, -1)
        return lse - z.gather(1, tgt[:, None])[:, 0], lse

    @torch.library.custom_op("pgolf::softcap_ce_grad", mutates_args=())
    def softcap_ce_grad(dnll: torch.Tensor, x: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor,
                        softcap: float) -> torch.Tensor:
        t = torch.tanh(x / softcap)
        p = torch.exp(softcap * t - lse[:, None])
        p[torch.arange(len(tgt)), tgt] -= 1
        return p * dnll[:, None] * (1 - t * t)


@pytest.mark.parametrize("slope", [0.5, 0.3])
def test_fused_mlp_backward_formulas_and_frozen_weights(reference_kernel_ops, slope):
    torch.manual_seed(0)
    x, w1, w2 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((64, 32), (128, 32), (32, 128)))
    g = torch.randn(64, 32, dtype=torch.float64)
    ref = torch.nn.functional.leaky_relu(x @ w1.T, slope).square() @ w2.T
    y = tg.FusedMLP.apply(x, w1, w2, slope)
    assert torch.allclose(y, ref)
    want = torch.autograd.grad(ref, (x, w1, w2), g)
    for a, b in zip(torch.autograd.grad(y, (x, w1, w2), g), want):
        assert torch.allclose(a, b)
    xf = x.detach().requires_grad_()
    w1f, w2f = w1.detach(), w2.detach()
    tg.FusedMLP.apply(xf, w1f, w2f, slope).backward(g)  # frozen weights (LoRA TTT): input grad only
    assert torch.allclose(xf.grad, want[0]) and w1f.grad is None


def test_softcap_ce_backward_matches_autograd_of_the_plain_loss(reference_kernel_ops):
    torch.manual_seed(0)
    x = (torch.randn(50, 40, dtype=torch.float64) * 20).requires_grad_()
    t, g = torch.randint(0, 40, (50,)), torch.rand(50, dtype=torch.float64)
    ref = torch.nn.functional.cross_entropy(30 * torch.tanh(x / 30), t, reduction="none")
    y = tg.SoftcapCE.apply(x, t, 30.0)
    assert torch.allclose(y, ref)
    assert torch.allclose(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_model_loss_fused_equals_plain(reference_kernel_ops, monkeypatch):
    """GPT.forward hands its logits to the fused CE: the same NLL and embedding gradient as the plain path."""
    model = randomized(tiny())
    idx = docs_batch(128)
    out = []
    for fused in (False, True):
        monkeypatch.setattr(tg, "use_fused_kernels", lambda x, f=fused: f)
        nll = model(idx, torch.roll(idx, -1, 1))
        out.append((nll, torch.autograd.grad(nll.sum(), model.tok_emb.weight)[0]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-4)  # fp32 sums; |grad| reaches ~60


@pytest.mark.parametrize("slope", [0.5, 0.3])
def test_mlp_output_scale_folds_into_proj_fused_and_plain(reference_kernel_ops, monkeypatch, slope):
    """out_scale * proj(act(fc(n))) with the scale folded into the proj weight: same values and
    gradients (scale included) on the fused and the plain path, at MLP_LEAKY_SLOPE `slope`."""
    torch.manual_seed(0)
    mlp = tg.MLP(tiny(MLP_LEAKY_SLOPE=slope)).double()
    with torch.no_grad():
        mlp.proj.weight.normal_()
    n = torch.randn(2, 16, mlp.fc.weight.size(1), dtype=torch.float64, requires_grad=True)
    scale = torch.randn(mlp.proj.weight.size(0), dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 16, mlp.proj.weight.size(0), dtype=torch.float64)
    params = (n, scale, mlp.fc.weight, mlp.proj.weight)
    u = n @ mlp.fc.weight.T
    ref = scale * (torch.where(u > 0, u, slope * u).square() @ mlp.proj.weight.T)
    want = torch.autograd.grad(ref, params, g)
    for fused in (False, True):
        monkeypatch.setattr(tg, "use_fused_mlp", lambda x, hidden, f=fused: f)
        out = mlp(n, scale)
        assert torch.allclose(out, ref)
        for a, b in zip(torch.autograd.grad(out, params, g), want):
            assert torch.allclose(a, b)


def test_segment_ids_match_a_cummax_reference():
    """segment_ids finds each document's start by scatter + gather; cummax is the plain statement."""
    def reference(idx, bos, max_len):
        pos = torch.arange(idx.size(1)).expand_as(idx)
        start = torch.where(idx == bos, pos, torch.zeros_like(pos)).cummax(dim=1).values
        return ((idx == bos) | ((pos - start) % max_len == 0)).long().cumsum(dim=1).to(torch.int32)
    g = torch.Generator().manual_seed(0)
    for rate in (0.0, 0.01, 0.3, 1.0):
        for T in (1, 7, 300, 5000):
            idx = torch.randint(2, 50, (3, T), generator=g)
            idx[torch.rand(3, T, generator=g) < rate] = BOS
            for max_len in (1, 16, 2048):
                assert torch.equal(tg.segment_ids(idx, BOS, max_len), reference(idx, BOS, max_len))


# ---- sequence lengths: progressive training context (PR #2014), longer eval context ----------------


def test_seq_schedule_parsing_and_spans():
    h = tiny(TRAIN_SEQ_SCHEDULE="64@0.25,128@0.5,256@1.0", SEQ_CHANGE_WARMUP_STEPS=4)
    assert h.seq_plan == [(0.25, 64), (0.5, 128), (1.0, 256)]
    assert [tg.seq_span(f, h) for f in (0, 0.25, 0.2501, 0.5, 0.9, 1.0)] == [64, 64, 128, 128, 256, 256]
    assert [tg.rewarm(k, h) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert tiny().seq_plan == [] and tg.seq_span(0.3, tiny()) == tiny().train_seq_len
    for bad, why in (("64@0.5,256@0.9", "1.0"), ("128@0.5,64@1.0", "TRAIN_SEQ_LEN"), ("64-0.5", "span@frac"),
                     ("256@0.5,64@0.4,256@1.0", "rise")):
        with pytest.raises(ValueError, match=why):
            tiny(TRAIN_SEQ_SCHEDULE=bad)
    with pytest.raises(ValueError, match="training fraction"):  # PR #2014 mode knob: not needed here
        tiny(TRAIN_SEQ_SCHEDULE_MODE="wallclock")


def spans_seen(model):
    """Record (looping, span, grad mode) of every forward of `model`."""
    seen, segments = [], model.attention_segments

    def spy(idx):
        seen.append((model.looping, model.seq_len, torch.is_grad_enabled()))
        return segments(idx)
    model.attention_segments = spy
    return seen


def test_compile_warmup_runs_every_scheduled_span():
    h = tiny(TRAIN_SEQ_SCHEDULE="64@0.25,128@0.5,256@1.0", WARMUP_STEPS=1)
    model = tg.GPT(h, BOS, "sdpa")
    seen = spans_seen(model)
    tg.compile_warmup(model, h, tg.Dist(0, 1, 0, torch.device("cpu")), 128)
    assert set(seen) == {(loop, n, grad) for loop in (False, True) for n in (64, 128, 256) for grad in (False, True)}
    assert model.seq_len == 256 and not model.looping
    model = tg.GPT(tiny(WARMUP_STEPS=1), BOS, "sdpa")  # no schedule: the spans of today
    seen = spans_seen(model)
    tg.compile_warmup(model, tiny(WARMUP_STEPS=1), tg.Dist(0, 1, 0, torch.device("cpu")), 128)
    assert {n for _, n, _ in seen} == {256} and len(seen) == 2 * (8 // 1 + 1)  # 1 step of 8 slots + eval


def test_training_switches_spans_at_their_fractions_and_rewarms_the_lr(monkeypatch):
    h = tiny(TRAIN_SEQ_SCHEDULE="64@0.25,128@0.5,256@1.0", SEQ_CHANGE_WARMUP_STEPS=4, ITERATIONS=16,
             TRAIN_BATCH_TOKENS=8 * 256, NUM_LOOPS=0)
    d, gen = tg.Dist(0, 1, 0, torch.device("cpu")), torch.Generator().manual_seed(0)
    monkeypatch.setattr(tg, "TrainLoader", lambda *a: type("L", (), {"next_step": lambda self: tg.synthetic_batches(h, d, 1, gen)})())
    lrs, step = [], tg.Optimizers.step
    monkeypatch.setattr(tg.Optimizers, "step", lambda self, lr, m: lrs.append(lr) or step(self, lr, m))
    model = tg.GPT(h, BOS, "sdpa")
    seen = spans_seen(model)
    tokens = torch.randint(4, 128, (2 * 256 + 1,), generator=gen)
    tokens[::256] = BOS
    val = tg.ValData(tokens, torch.ones(2 * 256), BOS)  # train() ends with the raw-weights eval
    stats = tg.train(model, h, d, types.SimpleNamespace(train_files=[]), val, lambda *a: None, tg.Timer(d.device))
    assert stats["steps"] == 16
    spans = [n for _, n, _ in seen][:16 * 8:8]  # 8 micro-steps per step (then the raw eval)
    assert spans == [64] * 5 + [128] * 4 + [256] * 7  # step/16 <= 0.25, <= 0.5, then the rest
    factor = [lr / tg.lr_multiplier(s / 16, h) for s, lr in enumerate(lrs)]
    assert factor == pytest.approx([1] * 5 + [0.25, 0.5, 0.75, 1] + [0.25, 0.5, 0.75, 1, 1, 1, 1])


def test_eval_context_reaches_beyond_the_train_span():
    """EVAL_SEQ_LEN 3072 with TRAIN_SEQ_LEN 2048: scoring cuts documents at 3072, so a token 2,100
    positions back moves the score; at the training span of 2048 it cannot."""
    h = tiny(TRAIN_SEQ_LEN=2048, EVAL_SEQ_LEN=3072, TTT_EVAL_SEQ_LEN=3072, EVAL_STRIDE=1024, NUM_LAYERS=4,
             MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3)
    model = randomized(h).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(4, 128, (1, 3072), generator=g)
    idx[0, 0] = BOS
    pert = idx.clone()
    pert[0, 3000 - 2100] += 1
    y = torch.roll(idx, -1, 1)
    tg.scoring_state(model, h)
    assert model.seq_len == 3072
    assert model(pert, y)[0, 3000] != model(idx, y)[0, 3000]
    model.seq_len = h.train_seq_len
    assert model(pert, y)[0, 3000] == model(idx, y)[0, 3000]
    tg.scoring_state(model, h)  # the sliding eval: target 3150 sees the token at 900
    scores = []
    for tokens in (torch.cat([idx[0], idx[0, 1:129]]), torch.cat([pert[0], idx[0, 1:129]])):
        led = tg.ScoreLedger(tokens.numel() - 1, torch.device("cpu"))
        with legality.patched("account", legality.keeping_nll):  # per-target NLLs on led.nll
            tg.eval_sliding(model, tg.ValData(tokens, torch.ones(tokens.numel() - 1), BOS), h,
                            tg.Dist(0, 1, 0, torch.device("cpu")), led, lambda *a: None)
        scores.append(led.nll)
    assert scores[0][3150] != scores[1][3150] and torch.equal(scores[0][:899], scores[1][:899])  # causal
