"""1, 2 and 8 ranks (gloo on CPU) take identical optimizer steps: same batches per step, sharded
Muon (reduce-scatter + all-gather, stacks padded to the world size), replicated AdamW, global clip."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import free_port

STEPS = 3


def rank_setup(rank: int, world: int, smoke_dir: str, port: int):
    """What torchrun provides, then the script's own init: (config, Dist, data spec)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    h = tg.load_config({"SMOKE": "1", "DATA_PATH": smoke_dir,
                        "TOKENIZER_PATH": os.path.join(smoke_dir, "smoke_caseops_1024.model")})
    d, spec = tg.init_distributed(h), tg.load_data_spec(h)
    torch.manual_seed(h.seed)
    return h, d, spec


def run_steps(rank: int, world: int, smoke_dir: str, port: int, out: str):
    h, d, spec = rank_setup(rank, world, smoke_dir, port)
    model = tg.GPT(h, spec.bos_id, "sdpa")
    model.looping = True
    opt, loader = tg.Optimizers(model, d, h), tg.TrainLoader(spec.train_files, h.slot_tokens, d)
    for step in range(STEPS):
        tg.forward_backward(model, loader.next_step())
        opt.step(1.0, tg.muon_momentum(step, step / h.iterations, h))
        opt.zero_grad()
    if rank == 0:
        torch.save(model.state_dict(), out)
    if dist.is_initialized():
        dist.destroy_process_group()


def trained(world: int, smoke_dir: str, tmp_path) -> dict:
    out = str(tmp_path / f"w{world}.pt")
    if world == 1:
        run_steps(0, 1, smoke_dir, 0, out)
    else:
        mp.spawn(run_steps, args=(world, smoke_dir, free_port(), out), nprocs=world, join=True)
    return torch.load(out)


@pytest.mark.parametrize("world", [2, 8])
def test_world_sizes_take_the_same_steps(world, smoke_dir, tmp_path):
    one, many = trained(1, smoke_dir, tmp_path), trained(world, smoke_dir, tmp_path)
    torch.manual_seed(tg.load_config({}).seed)
    init = tg.GPT(tg.load_config({"SMOKE": "1"}), 1, "sdpa").state_dict()
    total, diff = 0.0, 0.0
    for name, ref in one.items():
        step_one, step_many = ref - init[name], many[name] - init[name]
        assert step_one.norm() > 0, f"{name} never moved"
        # Reduction order differs across world sizes and Muon iterates in bf16 (and normalizes
        # away the scale of small early gradients), so updates agree to rounding amplified over 3
        # steps, not bitwise; a batching or sharding bug gives an O(1) difference.
        rel = ((step_many - step_one).norm() / step_one.norm()).item()
        assert rel < 0.15, (name, rel)
        total, diff = total + step_one.norm() ** 2, diff + (step_many - step_one).norm() ** 2
    assert (diff / total).sqrt() < 0.03


def quantize_on_rank(rank: int, world: int, smoke_dir: str, port: int, out_dir: str):
    """Every rank collects (all-reduced) Hessians and quantizes; rank 0 alone writes in main()."""
    h, d, spec = rank_setup(rank, world, smoke_dir, port)
    model = tg.GPT(h, spec.bos_id, "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hess = tg.collect_hessians(model, spec, h, d)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    blob = tg.serialize(tg.quantize_state_dict(sd, hess, h, log=lambda *a: None), h)
    with open(os.path.join(out_dir, f"blob{rank}.bin"), "wb") as f:
        f.write(blob)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_gptq_on_eight_ranks_writes_one_artifact(smoke_dir, tmp_path):
    mp.spawn(quantize_on_rank, args=(8, smoke_dir, free_port(), str(tmp_path)), nprocs=8, join=True)
    blobs = {open(tmp_path / f"blob{r}.bin", "rb").read() for r in range(8)}
    assert len(blobs) == 1  # identical Hessians after the all-reduce, so identical artifacts
    os.makedirs(tmp_path / "one")
    quantize_on_rank(0, 1, smoke_dir, 0, str(tmp_path / "one"))
    single = open(tmp_path / "one" / "blob0.bin", "rb").read()
    state8 = tg.dequantize_state_dict(tg.deserialize(blobs.pop()))
    state1 = tg.dequantize_state_dict(tg.deserialize(single))
    for name, w in state1.items():  # the calibration slots do not depend on the world size
        assert (state8[name] - w).abs().max() <= 0.05 * w.abs().max() + 1e-6, name


def test_hessians_cover_every_gptq_matrix_and_qkv_share_the_attention_input(smoke_dir):
    """q, k and v come from one fused matmul (no c_q/c_k/c_v module calls), so their Hessians are
    taken at the attention input: every GPTQ'd matrix must still get one (else it falls to RTN)."""
    h, d, spec = rank_setup(0, 1, smoke_dir, 0)
    model = tg.GPT(h, spec.bos_id, "sdpa")
    hess = tg.collect_hessians(model, spec, h, d)
    gptq = {n for n in model.state_dict() if n.endswith(tuple(tg.GPTQ_SUFFIXES))}
    assert gptq <= set(hess), sorted(gptq - set(hess))
    for i in range(h.num_layers):
        q, k, v = (hess[f"blocks.{i}.attn.{m}.weight"] for m in ("c_q", "c_k", "c_v"))
        assert torch.equal(q, k) and torch.equal(q, v) and q.data_ptr() != k.data_ptr()
        assert not torch.equal(q, hess[f"blocks.{i}.attn.proj.weight"]) and q.trace() > 0


def test_hessians_are_collected_loop_on_like_the_scored_model(smoke_dir):
    """A run stopped before ENABLE_LOOPING_AT ends with model.looping False, yet its artifact is
    scored loop-on (scoring_state): the Hessians must come from the looped model in both cases."""
    h, d, spec = rank_setup(0, 1, smoke_dir, 0)
    model = tg.GPT(h, spec.bos_id, "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.looping = True
    on = tg.collect_hessians(model, spec, h, d)
    model.looping = False  # e.g. a wall-clock stop before the loop switched on
    off = tg.collect_hessians(model, spec, h, d)
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    tg.scoring_state(model, h)
    assert model.looping and h.num_loops > 0
