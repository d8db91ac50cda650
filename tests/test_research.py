"""Issue 14 (one-GPU research): a clean start after the compile warmup, the record's lane 1, the
raw-weights eval beside the EMA one, the EMA warm-up ramp and the fraction-based momentum warm-up."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def smoke_env(smoke_dir, tmp_path, **over) -> dict:
    return {"SMOKE": "1", "DATA_PATH": smoke_dir, "ARTIFACT_DIR": str(tmp_path),
            "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model"), **over}


def recording(cls, made: list):
    def make(*a, **k):
        made.append(cls(*a, **k))
        return made[-1]
    return make


def same_state(a, b) -> bool:
    """Equal nested optimizer states (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


class FirstTimedStep(Exception):
    pass


def test_first_timed_step_starts_from_a_fresh_state(smoke_dir, tmp_path, monkeypatch):
    """main() on SMOKE with WARMUP_STEPS=1: the compile warmup takes real optimizer steps, and
    nothing of them reaches the timed run (spec 9 item 19). At the first timed step the weights
    and the EMA are the initial weights, the loop is off, no gradient is left, every optimizer
    buffer equals a fresh optimizer's and the loader serves its first batch."""
    for k, v in smoke_env(smoke_dir, tmp_path, WARMUP_STEPS="1", RUN_ID="clean").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    made, seen = {"Optimizers": [], "EMA": [], "TrainLoader": []}, {"warmup_steps": 0}
    for name, out in made.items():
        monkeypatch.setattr(tg, name, recording(getattr(tg, name), out))
    real_warmup, real_fb = tg.compile_warmup, tg.forward_backward

    def warmup(model, *a):
        seen["initial"] = copy.deepcopy(model.state_dict())
        real_warmup(model, *a)
        seen["done"] = True

    def forward_backward(model, batches):
        if seen.get("done"):
            seen["model"], seen["batches"] = model, batches
            raise FirstTimedStep
        seen["warmup_steps"] += 1
        return real_fb(model, batches)

    monkeypatch.setattr(tg, "compile_warmup", warmup)
    monkeypatch.setattr(tg, "forward_backward", forward_backward)
    with pytest.raises(FirstTimedStep):
        tg.main()
    model, initial, h = seen["model"], seen["initial"], tg.load_config()
    warm_opt = made["Optimizers"][0]
    assert seen["warmup_steps"] == 2 and any(st["buf"].abs().sum() > 0 for st in warm_opt.muon.state.values())
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert not model.looping and all(p.grad is None for p in model.parameters())
    opt, fresh = made["Optimizers"][-1], tg.Optimizers(model, CPU, h)
    assert same_state(opt.muon.state, fresh.muon.state)  # sharded momentum buffers included
    assert same_state(opt.adam.state_dict(), fresh.adam.state_dict())
    ema = made["EMA"][-1]
    assert ema.updates == 0 and all(p is q for p, q in zip(ema.params, model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    assert all(torch.equal(s, initial[n].float()) for n, s in zip(names, ema.shadow))
    assert len(made["TrainLoader"]) == 1
    first = tg.TrainLoader(tg.load_data_spec(h).train_files, h.slot_tokens, CPU).next_step()
    assert same_state(seen["batches"], first)


def lane_model():
    """4 layers, no loop, layer 3 parallel; every block is the identity (zero output projections)
    except the MLP of layer 3; skip gates, weights and lane scalars set by hand."""
    h = tg.load_config({"SMOKE": "1", "VOCAB_SIZE": "128", "NUM_LAYERS": "4", "NUM_LOOPS": "0",
                        "PARALLEL_START_LAYER": "3"})
    torch.manual_seed(0)
    model = tg.GPT(h, 1, "sdpa")
    b = model.blocks[3]
    with torch.no_grad():
        model.tok_emb.weight.normal_()
        model.skip_gates.copy_(torch.tensor([[0.7], [-0.4]]).expand_as(model.skip_gates))
        model.skip_weights.normal_()
        b.mlp.fc.weight.normal_(std=0.3)
        b.mlp.proj.weight.normal_(std=0.3)
        b.mlp_scale.uniform_(0.5, 1.5)
        b.lane_resid.copy_(torch.tensor([1.3, 0.6]))
        b.lane_post.copy_(torch.tensor([[0.9, 1.7], [0.4, 1.2]]))
    return model


def test_lane1_at_the_first_parallel_layer():
    """Record (spec 3.2, 9 item 20): both lanes start from the x entering the first parallel
    layer and the U-Net skip is merged into lane 0 only. The explicit formula of the whole tiny
    network."""
    model = lane_model()
    idx = torch.randint(2, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    idx[0, 0] = 1
    b = model.blocks[3]
    with torch.no_grad():
        x0 = model.embed(idx)
        g, w = torch.sigmoid(model.skip_gates), model.skip_weights
        x2 = g[0] * x0 + (1 - g[0]) * w[0] * x0  # position 2 merges the output of position 1 (x0)
        lane0 = g[1] * x2 + (1 - g[1]) * w[1] * x0  # position 3 merges the output of position 0
        r, p = b.lane_resid, b.lane_post  # attention outputs 0 (zero projection)

        def network(lane1):
            n = tg.rms_norm(lane1) * 0.5  # ln_scale 1/sqrt(3+1)
            m = b.mlp_scale * (F.leaky_relu(n @ b.mlp.fc.weight.T, 0.5).square() @ b.mlp.proj.weight.T)
            return tg.rms_norm(0.5 * ((r[0] * lane0 + p[1, 0] * m) + (r[1] * lane1 + p[1, 1] * m)))
        got = model.hidden(idx)
    assert torch.allclose(got, network(x2), atol=1e-5)
    assert not torch.allclose(got, network(lane0), atol=1e-3)  # lane 1 from the merged x: our old model


def test_raw_eval_is_logged_and_changes_nothing(smoke_dir, tmp_path, monkeypatch):
    """train() scores the raw (pre-EMA) weights after the clock stops: the score is that of the
    last step's weights, the eval changes neither the weights nor the EMA, and the model then
    holds the EMA exactly, with gradients enabled again."""
    h = tg.load_config(smoke_env(smoke_dir, tmp_path, ITERATIONS="2"))
    spec = tg.load_data_spec(h)
    full = tg.load_val_data(spec, h)
    val = tg.ValData(full.tokens[:4 * h.slot_tokens + 1], full.target_bytes[:4 * h.slot_tokens], full.bos_id)
    emas, calls, real_eval = [], [], tg.eval_val
    monkeypatch.setattr(tg, "EMA", recording(tg.EMA, emas))

    def eval_val(model, *a):
        before = copy.deepcopy(model.state_dict()), [s.clone() for s in emas[0].shadow]
        score = real_eval(model, *a)
        calls.append((before[0], score))
        assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
        assert all(torch.equal(s, t) for s, t in zip(emas[0].shadow, before[1]))
        return score

    monkeypatch.setattr(tg, "eval_val", eval_val)
    torch.manual_seed(0)
    model = tg.GPT(h, spec.bos_id, "sdpa")
    lines = []
    stats = tg.train(model, h, CPU, spec, val, lines.append, tg.Timer(CPU.device))
    (raw_weights, score), = calls
    assert stats["val_bpb_raw"] == score.bpb and stats["val_loss_raw"] == score.loss
    assert any(line.startswith("eval_raw val_loss") for line in lines)
    fresh = tg.GPT(h, spec.bos_id, "sdpa")
    fresh.load_state_dict(raw_weights)
    fresh.looping = model.looping  # the raw eval runs in the state training ended in
    led = tg.ScoreLedger(val.num_targets, CPU.device)
    assert real_eval(fresh, val, h, CPU, led, lines.append).bpb == pytest.approx(score.bpb, rel=1e-6)
    assert all(torch.equal(p.float(), s) for p, s in zip(model.parameters(), emas[0].shadow))
    assert not all(torch.equal(p, raw_weights[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def run_ema(decay: float, warmup: bool, thetas, init=1.0) -> float:
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(init)
    ema = tg.EMA(m, decay, warmup)
    for th in thetas:
        with torch.no_grad():
            m.weight.fill_(th)
        ema.update()
    return ema.shadow[0].item()


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_shadow_matches_the_closed_form(warmup):
    """After T updates e_T = prod_t d_t e_0 + sum_s (1 - d_s) prod_{t>s} d_t theta_s, with
    d_t = min(d, (1+t)/(10+t)) when ramped; the weight left on the init is then 9! T! / (T+9)!
    while the ramp is below d, else d^T."""
    T, d = 60, 0.9965
    thetas = torch.randn(T, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    dt = [min(d, (1 + t) / (10 + t)) if warmup else d for t in range(T)]
    want = math.prod(dt) * 1.0 + sum((1 - dt[s]) * math.prod(dt[s + 1:]) * thetas[s] for s in range(T))
    assert run_ema(d, warmup, thetas) == pytest.approx(want, abs=1e-5)
    init_weight = math.factorial(9) * math.factorial(T) / math.factorial(T + 9) if warmup else d ** T
    assert run_ema(d, warmup, [0.0] * T) == pytest.approx(init_weight, rel=1e-4, abs=1e-9)


def test_ema_ramp_meets_the_decay_at_step_2562():
    """The ramp only changes updates 0..2561 at d = 0.9965: the record's ~4,900-step EMA keeps
    0.9965^(4900-2562) = 2.7e-4 of its weight on them either way (README, deliberate differences)."""
    ema = tg.EMA(torch.nn.Linear(1, 1), 0.9965, True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(2561) < 0.9965 == ema.decay_at(2562)
    assert tg.EMA(torch.nn.Linear(1, 1), 0.9965, False).decay_at(0) == 0.9965
    assert 0.9965 ** (4900 - 2562) == pytest.approx(2.75e-4, rel=0.01)


def test_momentum_warmup_by_fraction():
    """MUON_MOMENTUM_WARMUP_FRAC replaces the 1,500-step warm-up (which a 300-step run never
    finishes) by one over a fraction of training; 0 keeps the steps."""
    h = tg.load_config({"MUON_MOMENTUM_WARMUP_FRAC": "0.24"})
    assert tg.muon_momentum(10, 0.0, h) == pytest.approx(0.92)
    assert tg.muon_momentum(10, 0.12, h) == pytest.approx(0.945)
    assert tg.muon_momentum(10, 0.5, h) == pytest.approx(0.97)
    steps = tg.load_config({})
    assert tg.muon_momentum(750, 0.9, steps) == pytest.approx(0.945)
    with pytest.raises(ValueError, match="MUON_MOMENTUM_WARMUP_FRAC"):
        tg.load_config({"MUON_MOMENTUM_WARMUP_FRAC": "1.5"})
