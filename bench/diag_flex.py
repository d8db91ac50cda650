import sys, os, torch
sys.path.insert(0, os.getcwd())
import train_gpt as t
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
dev = "cuda"
torch.manual_seed(0)
T = 4096
idx = torch.randint(4, 100, (2, T), device=dev); idx[torch.rand(idx.shape, device=dev) < 1/300] = 1
seg = t.segment_ids(idx, 1, 2048)
for dt in (torch.float32, torch.bfloat16):
    q = torch.randn(2, T, 8, 64, device=dev, dtype=dt); k, v = (torch.randn(2, T, 4, 64, device=dev, dtype=dt) for _ in range(2))
    qq, kk, vv = q.float().transpose(1,2), k.float().repeat_interleave(2, 2).transpose(1,2), v.float().repeat_interleave(2,2).transpose(1,2)
    tt = torch.arange(T, device=dev); mask = (seg[:, :, None]==seg[:, None, :]) & (tt[:,None]>=tt[None,:])
    s = (qq @ kk.mT)/8; s = s.masked_fill(~mask[:,None], -1e9); ref = (s.softmax(-1) @ vv).transpose(1,2)
    err = lambda a: ((a.float()-ref).norm()/ref.norm()).item()
    print(dt, "sdpa", err(t.attention(q, k, v, seg, "sdpa", 2048)))
    print(dt, "flex-compiled-mine", err(torch.compile(lambda q,k,v,s: t.attention(q,k,v,s,"flex",2048))(q,k,v,seg)))
    bm = t.flex_doc_mask(seg)
    fa = torch.compile(flex_attention)
    print(dt, "flex-compiled eager-mask", err(fa(q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),block_mask=bm,enable_gqa=True).transpose(1,2)))
    def mm(b,h,qi,ki): return (seg[b,qi]==seg[b,ki]) & (qi>=ki)
    cbm = create_block_mask(mm, 2, None, T, T, device=dev)
    print(dt, "flex-compiled create_block_mask", err(fa(q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),block_mask=cbm,enable_gqa=True).transpose(1,2)))
    print(dt, "mask dense equal", (bm.to_dense()==cbm.to_dense()).all().item())
