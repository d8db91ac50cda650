"""bench/bench_step.py measures a fixed input: its synthetic tokens are its own recipe, not the
trainer's warmup tokens (a change there once moved a step-time A/B by 4.7 %, bench/RESULTS.md)."""
import numpy as np
import torch

import train_gpt as tg
from bench import bench_step

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def test_synthetic_step_is_the_pinned_geometric_recipe():
    h = tg.load_config({"SMOKE": "1", "TRAIN_BATCH_TOKENS": str(8 * 4096)})
    rows = bench_step.synthetic_step(h, CPU, torch.Generator().manual_seed(1))
    x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    assert len(rows) == CPU.grad_accum and x.shape == y.shape == (8, 4096)
    assert torch.equal(x[:, 1:], y[:, :-1]) and 1 <= int(x.min()) and int(x.max()) < h.vocab_size
    gaps = np.diff(torch.nonzero(x.flatten() == 1).flatten().numpy())
    assert len(set(gaps.tolist())) > 10  # geometric document lengths, not fixed 300-token documents
    # the exact tokens for seed 1: a change of recipe changes what the benchmark measures
    assert (int((x == 1).sum()), int(x.sum())) == (102, 16842650)
    trainer = torch.cat([r[0] for r in tg.synthetic_batches(h, CPU, 1, torch.Generator().manual_seed(1))])
    assert not torch.equal(trainer, x)
