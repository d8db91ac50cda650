"""Kernel-level profile of one training step (loop off) at the record batch on one GPU.

  python bench/profile_step.py                              # synthetic tokens
  BENCH_DATA=/tmp/bench_caseops python bench/profile_step.py   # the bench pack's shards
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402
from bench_step import set_inductor  # noqa: E402


def kernel_groups(events) -> dict:
    """GPU time (ms) by kernel family: matmuls, flex attention, and the rest."""
    out = {"matmul": 0.0, "flex attention": 0.0, "other": 0.0}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:  # CPU ops: their kernels count below
            continue
        name, ms = e.key.lower(), e.device_time_total / 1000
        if "flex" in name or "triton_tem_fused" in name:
            out["flex attention"] += ms
        elif "gemm" in name or "cutlass" in name or "nvjet" in name or "sm90_xmma" in name:
            out["matmul"] += ms
        else:
            out["other"] += ms
    return out


set_inductor(os.environ.get("BENCH_INDUCTOR", ""))
def report_gaps(events, top: int = 15):
    """GPU idle time between consecutive kernels (the step is CPU-bound there), with neighbours."""
    ks = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(ks, ks[1:])]
    idle = [g for g in gaps if g[0] > 5]
    span = (ks[-1].time_range.end - ks[0].time_range.start) / 1000
    print(f"kernels span {span:.1f} ms; idle gaps > 5 us: {sum(g[0] for g in idle) / 1000:.1f} ms in {len(idle)}")
    for us, a, b in sorted(idle, reverse=True)[:top]:
        print(f"  {us / 1000:7.2f} ms idle after {a[:60]} before {b[:60]}")


d = tg.Dist(0, 1, 0, torch.device("cuda", 0))
h = tg.load_config({"WARMUP_STEPS": "2", "TRAIN_BATCH_TOKENS": os.environ.get("BT", "786432")})
model = tg.GPT(h, 1, "flex").to(d.device)
tg.compile_model(model)
tg.compile_warmup(model, h, d, h.slot_tokens)
opt, gen = tg.Optimizers(model, d, h), torch.Generator().manual_seed(1)
data = os.environ.get("BENCH_DATA")
if data:
    loader = tg.TrainLoader(tg.token_shards(data, "train"), h.slot_tokens, d)
batches = [loader.next_step() if data else tg.synthetic_batches(h, d, 1, gen) for _ in range(3)]
for b in batches[:2]:
    tg.forward_backward(model, b); opt.step(1.0, 0.95); opt.zero_grad()
torch.cuda.synchronize()
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as p:
    tg.forward_backward(model, batches[2]); opt.step(1.0, 0.95); opt.zero_grad()
    torch.cuda.synchronize()
events = p.key_averages()
kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: -e.device_time_total)
for e in kernels[:int(os.environ.get("ROWS", "40"))]:
    print(f"{e.device_time_total / 1000:8.2f} ms {e.count:5d}x  {e.key[:120]}")
print("GPU ms by family:", {k: round(v, 1) for k, v in kernel_groups(events).items()})
report_gaps(p.events())
