"""Kernel-level profile of one training step (loop off) at the record batch on one GPU."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

d = tg.Dist(0, 1, 0, torch.device("cuda", 0))
h = tg.load_config({"WARMUP_STEPS": "2", "TRAIN_BATCH_TOKENS": os.environ.get("BT", "786432")})
model = tg.GPT(h, 1, "flex").to(d.device)
tg.compile_model(model)
tg.compile_warmup(model, h, d, h.slot_tokens)
opt, gen = tg.Optimizers(model, d, h), torch.Generator().manual_seed(1)
batches = [tg.synthetic_batches(h, d, gen) for _ in range(3)]
for b in batches[:2]:
    tg.forward_backward(model, b); opt.step(1.0, 0.95); opt.zero_grad()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
    tg.forward_backward(model, batches[2]); opt.step(1.0, 0.95); opt.zero_grad()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
