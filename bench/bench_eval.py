"""Eval benchmark of train_gpt.py on synthetic documents (one GPU, record configuration).

  python bench/bench_eval.py                              # 300K tokens, doc lengths ~ FineWeb-like
  BENCH_EVAL_TOKENS=1000000 BENCH_EVAL_PREFIX=120 python bench/bench_eval.py
  torchrun --standalone --nproc_per_node=2 bench/bench_eval.py   # work split over NCCL ranks
  ATTN_BACKEND=varlen python bench/bench_eval.py                 # any train_gpt.py env name applies

Compiles the eval graphs on one randomly initialized record-size model (precompile_eval, as main()
does before training), then runs final_evaluation (warmup, diagnostic, sliding, phased LoRA TTT)
on a FRESH instance with the same weights, as after loading the artifact. Prints each phase's
time, the TTT chunk steps and ms per step, peak memory, and how many graphs the fresh instance
compiled (should be 0: the artifact's model reuses the precompiled graphs).
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def synthetic_docs(n_tokens: int, vocab: int, seed: int = 0) -> tg.ValData:
    """Lognormal doc lengths (median ~600, long tail capped at 12K), random ids, BOS = 1."""
    g = np.random.default_rng(seed)
    lens = []
    while sum(lens) < n_tokens:
        lens.append(int(min(12000, max(8, g.lognormal(6.4, 1.0)))))
    toks = np.concatenate([np.concatenate([[1], g.integers(2, vocab, n - 1)]) for n in lens])
    return tg.ValData(torch.from_numpy(toks).long(), torch.ones(toks.size - 1, dtype=torch.long), 1)


def main():
    n_tokens = int(os.environ.pop("BENCH_EVAL_TOKENS", "300000"))
    prefix = os.environ.pop("BENCH_EVAL_PREFIX", "60")
    h = tg.load_config({**os.environ, "PHASED_TTT_PREFIX_DOCS": prefix, "SLIDING_ENABLED": "1"})
    d = tg.init_distributed(h)
    backend = tg.pick_attention_backend(d.device, h.attn_backend)
    torch.manual_seed(0)
    trained = tg.GPT(h, 1, backend).to(d.device)  # stands in for the training model
    with torch.no_grad():  # nonzero everywhere, so every path (gates, smear, LoRA grads) is live
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tg.compile_model(trained)
    val = synthetic_docs(n_tokens, h.vocab_size)
    starts, ends = tg.find_docs(val.tokens, 1)
    steps = sum(tg.chunks_of(b, starts, ends, h) for b in tg.ttt_queue(ends - starts, h.ttt_batch_size))
    log = print if d.is_main else (lambda *a, **k: None)
    log(f"synthetic val: {val.num_targets} targets, {starts.size} docs, max doc {int((ends - starts).max())}, "
        f"TTT chunk steps {steps}, attention {backend}, world {d.world_size}")
    t0 = time.perf_counter()
    tg.precompile_eval(trained, h, d, 1)  # what main() does before training
    pre_s, pre_graphs = time.perf_counter() - t0, tg.compiled_graphs()
    log(f"precompile_eval: {pre_s:.1f}s, {pre_graphs} graphs", flush=True)
    model = tg.GPT(h, 1, backend).to(d.device)  # a fresh instance, as load_artifact builds
    model.load_state_dict(trained.state_dict())
    tg.compile_model(model)
    t0 = time.perf_counter()
    out = tg.final_evaluation(model, val, h, d, log, tg.Timer(d.device, h.eval_budget_seconds))
    if not d.is_main:
        return
    print(f"final_evaluation {time.perf_counter() - t0:.1f}s; graphs compiled after precompile_eval: "
          f"{tg.compiled_graphs() - pre_graphs} (should be 0)")
    print(f"TTT: {1000 * out['eval_time_s'] * d.world_size / steps:.1f} ms per chunk step per GPU (incl. global SGD); "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print({k: out[k] for k in ("val_bpb", "val_bpb_sliding", "val_bpb_diagnostic", "legality",
                               "tokens_scored", "eval_time_s", "eval_strict_s", "timings")})


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
