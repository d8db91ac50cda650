"""Flex-attention kernel options on the record's training shapes, with real document masks.

  . bench/gpu_env.sh && python bench/flex_tune.py       # masks from /tmp/bench_caseops shards

One step's worth of attention (8 packed rows of 98,304 tokens, 8 query / 4 KV heads of 64, the
BOS-derived BlockMask of train_gpt.py) times 11 layers, forward and forward + backward, for each
candidate `kernel_options`. Prints ms per training step spent in attention (loop off).
"""
import os
import sys
import time

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

FWD = [(128, 64, 3, 4), (128, 64, 2, 4), (128, 32, 3, 4), (64, 64, 4, 4)]
BWD = [(32, 128, 128, 32, 3, 4), (32, 128, 128, 32, 4, 4), (32, 128, 128, 32, 2, 4),
       (64, 128, 128, 64, 2, 8), (32, 64, 64, 32, 3, 4), (64, 64, 64, 64, 4, 4), (32, 128, 128, 32, 3, 8)]
BEST_FWD, BEST_BWD = FWD[0], BWD[0]


def options(fwd, bwd, extra=None) -> dict:
    o = dict(extra or {})
    if fwd:
        o.update(fwd_BLOCK_M=fwd[0], fwd_BLOCK_N=fwd[1], fwd_num_stages=fwd[2], fwd_num_warps=fwd[3])
    if bwd:
        o.update(zip(("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2",
                      "bwd_num_stages", "bwd_num_warps"), bwd))
    return o


def time_config(opts: dict, masks, qkv, layers: int = 11, reps: int = 2):
    torch._dynamo.reset()  # one compile per config: no recompile limit
    fn = torch.compile(lambda q, k, v, m: flex_attention(q, k, v, block_mask=m, enable_gqa=True,
                                                         kernel_options=opts), dynamic=False)
    q, k, v = qkv
    g = torch.randn_like(q)
    t0 = time.perf_counter()
    fn(q, k, v, masks[0]).backward(g)  # compile
    compile_s = time.perf_counter() - t0
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps * layers):
            for m in masks:
                y = fn(q, k, v, m)
                if mode == "fwd+bwd":
                    y.backward(g)
        torch.cuda.synchronize()
        out[mode] = 1000 * (time.perf_counter() - t0) / reps
    return compile_s, out


def main():
    d = tg.Dist(0, 1, 0, torch.device("cuda", 0))
    h = tg.load_config({})
    data = os.environ.get("BENCH_DATA", "/tmp/bench_caseops")
    loader = tg.TrainLoader(tg.token_shards(data, "train"), h.slot_tokens, d)
    loader.next_step()  # skip the first step (starts at a BOS)
    masks = [tg.flex_doc_mask(tg.segment_ids(x, 1, h.train_seq_len)) for x, _ in loader.next_step()]
    T = h.slot_tokens
    qkv = [torch.randn(1, n, T, h.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for n in (h.num_heads, h.num_kv_heads, h.num_kv_heads)]
    print(torch.__version__, torch.cuda.get_device_name(0), f"rows 8 x {T}, 11 layers", flush=True)
    trials = [(f, BEST_BWD, None) for f in FWD] + [(BEST_FWD, b, None) for b in BWD[1:]]
    trials += [(BEST_FWD, BEST_BWD, {k: True}) for k in ("USE_TMA", "ROWS_GUARANTEED_SAFE", "PRESCALE_QK")]
    for fwd, bwd, extra in trials:
        opts = options(fwd, bwd, extra)
        try:
            c, t = time_config(opts, masks, qkv)
            print(f"{str(opts or 'default'):110s} compile {c:5.1f}s fwd {t['fwd']:6.1f} ms "
                  f"fwd+bwd {t['fwd+bwd']:6.1f} ms", flush=True)
        except Exception as e:  # a config the kernel rejects (shared memory, static asserts)
            print(f"{str(opts):110s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
