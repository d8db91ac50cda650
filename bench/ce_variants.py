"""Per-kernel timing of softcap_ce_rows (train_gpt's fused softcapped cross-entropy) by num_warps.

  python bench/ce_variants.py

One 786K step calls it 8 times forward and 8 times backward on [98304, 8192] bf16 logits; prints
ms per step for each num_warps after checking nll and dx against train_gpt's launch (8 warps).
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402
from mlp_variants import timed  # noqa: E402


@triton.jit
def ce_fwd_maxfree(x, tgt, nll, lse, V, C: tl.constexpr, BV: tl.constexpr):
    """Forward of softcap_ce_rows without the max pass: |z| <= C = 30, so sum(exp(z)) stays far
    inside fp32 range (<= V e^30) and logsumexp needs no shift."""
    row, cols = tl.program_id(0).to(tl.int64), tl.arange(0, BV)
    keep, target = cols < V, tl.load(tgt + row)
    s = tl.sigmoid(2 * tl.load(x + row * V + cols, mask=keep, other=0.0).to(tl.float32) / C)
    z = C * (2 * s - 1)
    total = tl.log(tl.sum(tl.where(keep, tl.exp(z), 0.0), 0))
    tl.store(lse + row, total)
    tl.store(nll + row, total - tl.sum(tl.where(cols == target, z, 0.0), 0))


def main():
    torch.manual_seed(0)
    M, V, C = 98304, 8192, 30.0
    x = (torch.randn(M, V, device="cuda") * 8).bfloat16()
    tgt = torch.randint(0, V, (M,), device="cuda")
    dnll = torch.rand(M, device="cuda")
    nll, lse = tg.softcap_ce(x, tgt, C)
    dx = tg.softcap_ce_grad(dnll, x, tgt, lse, C)
    n2, l2, d2 = torch.empty_like(nll), torch.empty_like(lse), torch.empty_like(dx)
    print(f"logits {M}x{V} bf16: {2 * M * V / 1e9:.2f} GB per pass")
    for warps in (4, 8, 16, 32):
        def fwd():
            tg.softcap_ce_rows[(M,)](x, tgt, n2, l2, l2, n2, V, C=C, BV=V, GRAD=False,
                                     num_warps=warps)

        def bwd():
            tg.softcap_ce_rows[(M,)](x, tgt, n2, lse, dnll, d2, V, C=C, BV=V, GRAD=True,
                                     num_warps=warps)
        f, b = timed(fwd, reps=8), timed(bwd, reps=8)
        same = torch.equal(n2, nll) and torch.equal(l2, lse) and torch.equal(d2, dx)
        print(f"num_warps {warps:2d}: fwd {f:5.2f} bwd {b:5.2f} sum {f + b:5.2f} ms / step "
              f"{'identical' if same else 'DIFFERENT (max |dnll| %.1e)' % (n2 - nll).abs().max()}", flush=True)
    for warps in (4, 8, 16):
        f = timed(lambda: ce_fwd_maxfree[(M,)](x, tgt, n2, l2, V, C=C, BV=V, num_warps=warps), reps=8)
        print(f"max-free forward, num_warps {warps:2d}: fwd {f:5.2f} ms / step, max |dnll| "
              f"{(n2 - nll).abs().max():.1e}, max |dlse| {(l2 - lse).abs().max():.1e}", flush=True)


if __name__ == "__main__":
    main()
