"""The fused softcapped cross-entropy kernel (train_gpt.softcap_ce_rows) on a CPU, through Triton's
interpreter, against fp32 autograd of the plain loss: a check of the kernel's math where no GPU is
lent (the compiled GPU path is tests/test_gpu.py's).

  pip install triton && TRITON_INTERPRET=1 python bench/ce_interpret.py
"""
import os
import sys

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels must run in Triton's interpreter on a CPU)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

if tg.triton is None:
    sys.exit("Triton is not importable: pip install triton")
torch.manual_seed(0)
rows, vocab, cap = 6, 1000, tg.LOGIT_SOFTCAP
x = (torch.randn(rows, vocab) * 40).bfloat16()  # logits past the cap, as a trained head's can be
targets, g = torch.randint(0, vocab, (rows,)), torch.randn(rows)
ref = x.float().requires_grad_()
(F.cross_entropy(cap * torch.tanh(ref / cap), targets, reduction="none") * g).sum().backward()
got = x.clone().requires_grad_()
nll = tg.SoftcapCE.apply(got, targets, cap)
(nll * g).sum().backward()
want = F.cross_entropy(cap * torch.tanh(x.float() / cap), targets, reduction="none")
err_nll, err_dx = (nll - want).abs().max().item(), (got.grad.float() - ref.grad).abs().max().item()
print(f"nll max |err| {err_nll:.2e}; dx (bf16) max |err| {err_dx:.2e} of max |dx| {ref.grad.abs().max():.2f}")
ok = err_nll < 1e-4 and err_dx < 2 ** -7 * ref.grad.abs().max().item()
print("OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
