"""Document-masked attention kernels on the record's training shapes, with real document masks:
flex (train_gpt.FLEX_OPTIONS), PyTorch's FlashAttention-2 varlen, and cuDNN's ragged attention
(aten._cudnn_attention_forward with cumulative sequence lengths; K/V repeated to the query heads,
since that op has no GQA). Each is first checked against SDPA with a dense mask.

  . bench/gpu_env.sh && python bench/attn_backends.py

Prints ms per training step (8 micro-steps x 11 layers, loop off) spent in attention.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def cudnn_varlen(q, k, v, cu, max_len):
    """q [1,T,H,hd], k/v [1,T,Hkv,hd] -> [1,T,H,hd], causal within the cu segments."""
    rep = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    out = torch.ops.aten._cudnn_attention_forward(q[0], k[0], v[0], None, cu, cu, max_len, max_len,
                                                  True, 0.0, True, False)
    return out[0][None]


def via_train_gpt(backend: str):
    """train_gpt.attention itself, on the segments its backend takes."""
    return lambda q, k, v, seg, max_len: tg.attention(q, k, v, (seg, max_len) if backend == "varlen" else seg,
                                                      backend)


def reference(q, k, v, seg):
    return tg.attention(q.float(), k.float(), v.float(), seg, "sdpa")


def check(name, fn, arg, q, k, v, seg):
    qkv = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = [t.detach().float().clone().requires_grad_() for t in (q, k, v)]
    y, y_ref = fn(*qkv, arg, 2048), reference(*ref, seg)
    g = torch.randn_like(y_ref)
    y.backward(g.to(y.dtype))
    y_ref.backward(g)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    errs = [rel(y, y_ref)] + [rel(a.grad, b.grad) for a, b in zip(qkv, ref)]
    print(f"parity {name:14s} vs sdpa (out, dq, dk, dv): " + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return max(errs) < 2e-2


def timed(fn, args_per_mask, layers=11, backward=True) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(layers):
        for q, k, v, arg, g in args_per_mask:
            y = fn(q, k, v, arg, 2048)
            if backward:
                y.backward(g)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def main():
    dev = torch.device("cuda", 0)
    h = tg.load_config({})
    print(torch.__version__, torch.cuda.get_device_name(0), "cudnn", torch.backends.cudnn.version(), flush=True)
    loader = tg.TrainLoader(tg.token_shards(os.environ.get("BENCH_DATA", "/tmp/bench_caseops"), "train"),
                            h.slot_tokens, tg.Dist(0, 1, 0, dev))
    loader.next_step()
    segs = [tg.segment_ids(x, 1, h.train_seq_len) for x, _ in loader.next_step()]
    # parity on a 4096-token slice of a real row (dense SDPA reference is quadratic in memory)
    seg = segs[0][:, :4096] - segs[0][0, 0] + 1
    q = torch.randn(1, 4096, h.num_heads, h.head_dim, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4096, h.num_kv_heads, h.head_dim, device=dev, dtype=torch.bfloat16) for _ in "kv")
    kernels = {"flex": (via_train_gpt("flex"), tg.flex_doc_mask),
               "varlen_fa2": (via_train_gpt("varlen"), lambda s: tg.varlen_cu_seqlens(s, 1)),
               "cudnn": (cudnn_varlen, lambda s: tg.varlen_cu_seqlens(s, 1)),
               "cudnn_padded": (cudnn_varlen, tg.varlen_cu_seqlens)}
    ok = {}
    for name, (fn, prep) in kernels.items():
        try:
            ok[name] = check(name, fn, prep(seg), q, k, v, seg)
        except Exception as e:  # a kernel this torch/cuDNN build rejects
            print(f"parity {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    T = h.slot_tokens
    for name, (fn, prep) in kernels.items():
        if name not in ok:  # timed even with a wrong backward: is the kernel worth fixing?
            continue
        args = []
        for s in segs:
            qkv = [torch.randn(1, T, n, h.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for n in (h.num_heads, h.num_kv_heads, h.num_kv_heads)]
            args.append((*qkv, prep(s), torch.randn(1, T, h.num_heads, h.head_dim, device=dev, dtype=torch.bfloat16)))
        timed(fn, args[:1], layers=1)  # compile / autotune
        fwd, both = timed(fn, args, backward=False), timed(fn, args)
        print(f"{name:14s} fwd {fwd:6.1f} ms  fwd+bwd {both:6.1f} ms per step"
              f"{'' if ok[name] else '  (parity FAILED)'}", flush=True)
    if ok.get("cudnn"):  # inside a compiled region, as the blocks would call it
        fn = torch.compile(lambda q, k, v, cu: cudnn_varlen(q, k, v, cu, 2048), fullgraph=True, dynamic=False)
        cu = tg.varlen_cu_seqlens(seg)
        ok_c = check("cudnn compiled", lambda q, k, v, c, m: fn(q, k, v, c), cu, q, k, v, seg)
        print("compiled cudnn parity ok:", ok_c)


if __name__ == "__main__":
    main()
