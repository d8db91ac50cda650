"""The fused LeakyReLU(0.5)^2 MLP of train_gpt.py against the unfused ops, on one GPU.

  python bench/bench_mlp.py        # parity, then ms per training step for each tile config

Shapes of one 786K-token training step: 8 micro-steps x 11 layers of a [98304, 512] input
through fc 512 -> 2048 and proj 2048 -> 512, forward + backward, bf16.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

TILES = [(128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
         (64, 256, 64, 4, 4), (128, 128, 64, 8, 3)]


def unfused(x, w1, w2):
    return F.leaky_relu(x @ w1.T, 0.5).square() @ w2.T


def fused(x, w1, w2):
    return tg.FusedMLP.apply(x, w1, w2, 0.5)


def timed(fn, x, w1, w2, g, reps: int = 88) -> float:
    fn(x, w1, w2).backward(g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x, w1, w2).backward(g)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def main():
    torch.manual_seed(0)
    M, D = 98304, 512
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(4 * D, D, device="cuda") / D**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(D, 4 * D, device="cuda") / (4 * D)**0.5).bfloat16().requires_grad_()
    g = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    for tile in TILES:
        tg.MLP_TILE = tile
        try:
            fused(x, w1, w2).backward(g)
        except Exception as e:  # a tile that does not fit (shared memory)
            print(f"tile {tile}: {type(e).__name__} {str(e)[:100]}")
            continue
        grads = []
        for fn in (unfused, fused):
            x.grad = w1.grad = w2.grad = None
            y = fn(x, w1, w2)
            y.backward(g)
            grads.append([y] + [t.grad for t in (x, w1, w2)])
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*grads)]
        ms = timed(fused, x, w1, w2, g)
        print(f"tile {tile}: fused {ms:6.1f} ms/step | rel err out/dx/dw1/dw2 "
              + " ".join(f"{e:.1e}" for e in errs), flush=True)
    print(f"unfused (cuBLAS + eager pointwise): {timed(unfused, x, w1, w2, g):6.1f} ms/step; compiled: "
          f"{timed(torch.compile(unfused), x, w1, w2, g):6.1f} ms/step")


if __name__ == "__main__":
    main()
