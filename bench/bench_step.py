"""Step-time benchmark of train_gpt.py's model + optimizer on synthetic tokens (one GPU).

  python bench/bench_step.py                       # record batch 786432, then 262144
  BENCH_BATCHES=786432 BENCH_STEPS=10 python bench/bench_step.py
  BENCH_DATA=/tmp/bench_caseops python bench/bench_step.py   # real shards instead of random tokens
  ATTN_BACKEND=varlen python bench/bench_step.py            # one backend (default: what auto picks)
  FUSED_MLP=0 python bench/bench_step.py                    # A/B: the MLP without the Triton kernel
  MLP_LEAKY_SLOPE=0.3 python bench/bench_step.py            # A/B: any declared train_gpt env var (a lever)
  FLEX_DEFAULTS=1 python bench/bench_step.py                # A/B: torch's flex tiles, not FLEX_OPTIONS
  BENCH_LOOP=1 python bench/bench_step.py                   # + the training loop's per-step clock and EMA
  BENCH_INDUCTOR=coordinate_descent_tuning=1 python bench/bench_step.py   # A/B: inductor settings

Prints compile time, ms/step with the loop off and on, tokens/s and peak memory per batch size,
plus a parity check of the compiled flex-attention document mask against an SDPA reference.
"""
import dataclasses
import os
import sys
import time

import torch
import torch._inductor.config  # noqa: F401  (BENCH_INDUCTOR)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def parity_check(device, backend: str):
    """Compiled attention of `backend` with its document segments == SDPA with a dense mask, for
    the bare kernel and for the whole looped model."""
    torch.manual_seed(0)
    h = tg.load_config({"TRAIN_BATCH_TOKENS": str(8 * 4096)})
    model, ref = tg.GPT(h, 1, backend).to(device), tg.GPT(h, 1, "sdpa").to(device)
    idx = torch.randint(4, 100, (2, 4096), device=device)
    idx[torch.rand_like(idx, dtype=torch.float) < 1 / 300] = 1
    q = torch.randn(2, 4096, 8, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4096, 4, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    fn = torch.compile(lambda q, k, v, s: tg.attention(q, k, v, s, backend), fullgraph=True)
    a = fn(q, k, v, model.attention_segments(idx))
    b = tg.attention(q, k, v, ref.attention_segments(idx), "sdpa")
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    print(f"parity {backend} vs sdpa: rel err {err:.2e}")
    assert err < 2e-2, err
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    ref.load_state_dict(model.state_dict())
    ref.compute_dtype = torch.bfloat16
    tg.compile_model(model)
    model.looping = ref.looping = True
    y = torch.roll(idx, -1, 1)
    with torch.no_grad():
        nll, ref_nll = model(idx, y), ref(idx, y)
    diff = (nll - ref_nll).abs().max().item()
    print(f"model parity {backend} vs sdpa (looped, random weights): max |dNLL| {diff:.3e}, "
          f"mean NLL {nll.mean().item():.4f}")
    assert diff < 0.05, diff


def synthetic_step(h, d, gen: torch.Generator) -> list:
    """One step's micro-batches of random tokens with a BOS at each position with probability 1/300
    (geometric document lengths, mean 300): the recipe of every synthetic-token number in
    bench/RESULTS.md. The benchmark keeps its own generator so that a change to the trainer's
    warmup tokens (train_gpt.synthetic_batches: fixed 300-token documents since 6411254) does not
    change what it measures; attention's work depends on the document lengths."""
    out = []
    for _ in range(d.grad_accum):
        row = torch.randint(4, h.vocab_size, (h.slot_tokens + 1,), generator=gen)
        row[torch.rand(row.numel(), generator=gen) < 1 / 300] = 1
        row = row.to(d.device)
        out.append((row[None, :-1], row[None, 1:]))
    return out


def bench(batch_tokens: int, steps: int, d, backend: str):
    fields = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    env = {k: v for k, v in os.environ.items() if k in fields}  # the levers under test
    h = tg.load_config({**env, "TRAIN_BATCH_TOKENS": str(batch_tokens), "WARMUP_STEPS": "3"})
    torch.manual_seed(0)
    model = tg.GPT(h, 1, backend).to(d.device)
    tg.compile_model(model)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tg.compile_warmup(model, h, d, h.slot_tokens)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    opt, gen, out = tg.Optimizers(model, d, h), torch.Generator().manual_seed(1), {}
    data = os.environ.get("BENCH_DATA")  # real documents: attention work depends on doc lengths
    if data:
        loader = tg.TrainLoader(tg.token_shards(data, "train"), h.slot_tokens, d)
    next_batch = loader.next_step if data else (lambda: synthetic_step(h, d, gen))
    losses = []  # every step's loss, read after the timing: fixed seeds, so two versions compare
    for looping in (False, True):
        model.looping = looping
        batches = [next_batch() for _ in range(steps)]
        losses.append(tg.forward_backward(model, batches[0])); opt.step(1.0, 0.95); opt.zero_grad()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for b, done in zip(batches, events[1:]):  # events time each step without a host sync
            losses.append(tg.forward_backward(model, b))
            opt.step(1.0, 0.95)
            opt.zero_grad()
            done.record()
        torch.cuda.synchronize()
        per_step = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
        out[looping] = sum(per_step) / steps
        print(f"loop {'on' if looping else 'off'} per step (ms): " + " ".join(f"{t:.0f}" for t in per_step)
              + f" | median {sorted(per_step)[steps // 2]:.1f}", flush=True)
    print(f"losses of the {len(losses)} steps (loop off, then on): " + " ".join(f"{x.item():.4f}" for x in losses))
    if os.environ.get("BENCH_LOOP") == "1":  # what train() adds per step: the clock sync, EMA
        model.looping, ema, clock = False, tg.EMA(model, h.ema_decay, h.ema_warmup), tg.Timer(d.device)
        for extras in ("clock", "clock+ema"):
            batches = [next_batch() for _ in range(steps)]
            t0 = time.perf_counter()
            for b in batches:
                tg.forward_backward(model, b); opt.step(1.0, 0.95); opt.zero_grad()
                ema.update() if extras == "clock+ema" else None
                clock.slowest()
            torch.cuda.synchronize()
            print(f"loop off with {extras} per step: {1000 * (time.perf_counter() - t0) / steps:.1f} ms")
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"batch {batch_tokens} {backend} ({'bench-pack' if data else 'synthetic'} tokens): "
          f"compile+warmup {compile_s:.1f}s | ms/step loop-off {out[False]:.1f} "
          f"({batch_tokens / out[False] * 1e3:,.0f} tok/s) loop-on {out[True]:.1f} "
          f"({batch_tokens / out[True] * 1e3:,.0f} tok/s) | peak {peak:.1f} GiB", flush=True)


def set_inductor(spec: str):
    """BENCH_INDUCTOR="name=value,...": top-level torch._inductor.config flags (ints or booleans)."""
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        old = getattr(torch._inductor.config, name)
        setattr(torch._inductor.config, name, bool(int(value)) if isinstance(old, bool) else int(value))
        print(f"inductor {name}: {old} -> {getattr(torch._inductor.config, name)}")


def main():
    set_inductor(os.environ.get("BENCH_INDUCTOR", ""))
    d = tg.Dist(0, 1, 0, torch.device("cuda", 0))
    torch.backends.cuda.matmul.allow_tf32 = True
    backend = tg.pick_attention_backend(d.device, os.environ.get("ATTN_BACKEND", "auto"))
    if os.environ.get("FUSED_MLP") == "0":
        tg.use_fused_mlp = lambda n, hidden: False
    if os.environ.get("FLEX_DEFAULTS") == "1":
        tg.FLEX_OPTIONS.clear()
    print(torch.__version__, torch.cuda.get_device_name(0), "attention:", backend)
    parity_check(d.device, backend)
    steps = int(os.environ.get("BENCH_STEPS", "6"))
    for bt in map(int, os.environ.get("BENCH_BATCHES", "786432,262144").split(",")):
        bench(bt, steps, d, backend)


if __name__ == "__main__":
    main()
