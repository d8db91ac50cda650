"""Per-kernel timing of mlp_act_matmul variants against cuBLAS, at one micro-step's MLP shapes.

  python bench/mlp_variants.py                      # TMA variants, then pointer-load variants
  POINTER_VARIANTS=0 python bench/mlp_variants.py   # TMA variants only
  TMA_VARIANTS=0 python bench/mlp_variants.py       # pointer-load variants only (tiles x programs per SM)

Times 88 launches (one 786K step, loop off) of the forward (x W1^T -> pre, post) and the gradient
(dout W2 -> dpre) kernels for each variant, after checking them against train_gpt's kernel.
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


@triton.jit
def variant(a, b, pre, out, M, N, K, GRAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, PROGS: tl.constexpr):
    """train_gpt's kernel with the persistent stride as a parameter: PROGS programs share the
    tiles, so a grid of 2 x SMs puts two programs on each SM (when registers and shared memory
    allow), and one program's epilogue stores overlap the other's main loop."""
    n_blocks = N // BN
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * n_blocks, PROGS, flatten=True):
        rm = (tile // n_blocks) * BM + tl.arange(0, BM)
        rn = (tile % n_blocks) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptr = a + (rm % M)[:, None] * K + rk[None, :]
        b_ptr = b + rn[:, None] * K + rk[None, :]
        offs, keep = rm[:, None] * N + rn[None, :], (rm < M)[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            acc = tl.dot(tl.load(a_ptr), tl.load(b_ptr).T, acc)
            a_ptr += BK
            b_ptr += BK
        if GRAD:
            p = tl.load(pre + offs, mask=keep).to(tl.float32)
            tl.store(out + offs, (acc * tl.where(p > 0, 2 * p, 0.5 * p)).to(out.dtype.element_ty), mask=keep)
        else:
            p = acc.to(pre.dtype.element_ty)
            tl.store(pre + offs, p, mask=keep)
            y = tl.where(p > 0, p, 0.5 * p).to(tl.float32)
            tl.store(out + offs, (y * y).to(out.dtype.element_ty), mask=keep)


@triton.jit
def tma_variant(a_desc, b_desc, pre_desc, out_desc, M, N, K, GRAD: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, SMS: tl.constexpr, SUB: tl.constexpr):
    """TMA loads and TMA (bulk, asynchronous) stores; SUB stores the tile in two column halves."""
    n_blocks = N // BN
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * n_blocks, SMS, flatten=True):
        om, on = (tile // n_blocks) * BM, (tile % n_blocks) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([om, k]), b_desc.load([on, k]).T, acc)
        if SUB:
            halves = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            cols = (on, on + BN // 2)
        else:
            halves, cols = (acc,), (on,)
        for i in tl.static_range(2 if SUB else 1):
            c = halves[i]
            if GRAD:
                p = pre_desc.load([om, cols[i]]).to(tl.float32)
                out_desc.store([om, cols[i]], (c * tl.where(p > 0, 2 * p, 0.5 * p)).to(tl.bfloat16))
            else:
                p = c.to(tl.bfloat16)
                pre_desc.store([om, cols[i]], p)
                y = tl.where(p > 0, p, 0.5 * p).to(tl.float32)
                out_desc.store([om, cols[i]], (y * y).to(tl.bfloat16))


def launch_tma(a, b, pre, out, grad, tile, sub):
    from triton.tools.tensor_descriptor import TensorDescriptor
    (M, K), N, (BM, BN, BK, warps, stages) = a.shape, b.size(0), tile
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    cn = BN // 2 if sub else BN
    descs = [TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BN, BK]),
             TensorDescriptor.from_tensor(pre, [BM, cn]), TensorDescriptor.from_tensor(out, [BM, cn])]
    tma_variant[(min(sms, triton.cdiv(M, BM) * (N // BN)),)](
        *descs, M, N, K, GRAD=grad, BM=BM, BN=BN, BK=BK, SMS=sms, SUB=sub, num_warps=warps,
        num_stages=stages)


def launch(a, b, pre, out, grad, tile, per_sm):
    """per_sm programs per SM (0: one program per tile, no persistence)."""
    (M, K), N, (BM, BN, BK, warps, stages) = a.shape, b.size(0), tile
    tiles = triton.cdiv(M, BM) * (N // BN)
    progs = min(per_sm * torch.cuda.get_device_properties(a.device).multi_processor_count, tiles) if per_sm else tiles
    return variant[(progs,)](a, b, pre, out, M, N, K, GRAD=grad, BM=BM, BN=BN, BK=BK, PROGS=progs,
                             num_warps=warps, num_stages=stages)


def timed(fn, reps=88) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def main():
    torch.manual_seed(0)
    M, D, H = 98304, 512, 2048
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, g = torch.randn(M, D, **bf), torch.randn(M, D, **bf)
    w1, w2 = torch.randn(H, D, **bf) / D**0.5, torch.randn(D, H, **bf) / H**0.5
    w2t = w2.T.contiguous()
    ref_pre, ref_post = tg.mlp_up(x, w1, 0.5)
    ref_d = tg.mlp_up_grad(g, w2, ref_pre, 0.5)
    pre, post, d = (torch.empty(M, H, **bf) for _ in range(3))
    print(f"cuBLAS x @ W1^T (pre only): {timed(lambda: torch.mm(x, w1.T, out=pre)):.1f} ms / 88")
    print(f"train_gpt fwd {timed(lambda: tg.launch_mlp_act(x, w1, pre, post, False, 0.5)):.1f} ms, "
          f"grad {timed(lambda: tg.launch_mlp_act(g, w2t, ref_pre, d, True, 0.5)):.1f} ms / 88")
    tma_tiles = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 2), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4)]
    for tile in tma_tiles if os.environ.get("TMA_VARIANTS", "1") == "1" else []:
        for sub in (False, True):
            try:
                launch_tma(x, w1, pre, post, False, tile, sub)
                launch_tma(g, w2t, ref_pre, d, True, tile, sub)
            except Exception as e:  # shared memory / registers / an older Triton
                print(f"TMA {tile} sub={sub}: {type(e).__name__} {str(e)[:120]}")
                continue
            same = torch.equal(pre, ref_pre) and torch.equal(post, ref_post) and torch.equal(d, ref_d)
            f = timed(lambda: launch_tma(x, w1, pre, post, False, tile, sub))
            b = timed(lambda: launch_tma(g, w2t, ref_pre, d, True, tile, sub))
            print(f"TMA {tile} sub={sub:d}: fwd {f:5.1f} grad {b:5.1f} sum {f + b:5.1f} ms / 88 "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
    if os.environ.get("POINTER_VARIANTS", "1") == "0":
        return
    tiles = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 4, 2), (128, 128, 64, 8, 3),
             (128, 128, 64, 8, 2), (64, 256, 64, 4, 3), (128, 64, 64, 4, 3), (256, 128, 64, 8, 2)]
    for tile in tiles:
        for per_sm in (1, 2, 3, 0):
            try:
                k = launch(x, w1, pre, post, False, tile, per_sm)
                launch(g, w2t, ref_pre, d, True, tile, per_sm)
            except Exception as e:  # shared memory / registers
                print(f"{tile} per_sm={per_sm}: {type(e).__name__} {str(e)[:80]}")
                continue
            same = torch.equal(pre, ref_pre) and torch.equal(post, ref_post) and torch.equal(d, ref_d)
            f = timed(lambda: launch(x, w1, pre, post, False, tile, per_sm))
            b = timed(lambda: launch(g, w2t, ref_pre, d, True, tile, per_sm))
            print(f"{tile} per_sm={per_sm} (regs {k.n_regs}, smem {k.metadata.shared // 1024} KB): "
                  f"fwd {f:5.1f} grad {b:5.1f} sum {f + b:5.1f} ms / 88 "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)


if __name__ == "__main__":
    main()
