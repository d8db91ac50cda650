"""GPU kernels of train_gpt.py against plain PyTorch: the fused LeakyReLU^2 MLP (slopes 0.5 and 0.3) and
softcapped cross-entropy (Triton), flex attention with the tuned kernel
options, and the compile count of a TRAIN_SEQ_SCHEDULE after its warmup. Skipped without CUDA; run on the device with
`python -m pytest tests/test_gpu.py` (results in bench/RESULTS.md)."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or tg.triton is None,
                                reason="needs a CUDA GPU and Triton")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def mlp_ref(x, w1, w2, slope=0.5):
    return F.leaky_relu(x @ w1.T, slope).square() @ w2.T


def mlp_inputs(M, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(M, 512, device="cuda", requires_grad=True)
    w1 = (torch.randn(2048, 512, device="cuda") / 512**0.5).requires_grad_()
    w2 = (torch.randn(512, 2048, device="cuda") / 2048**0.5).requires_grad_()
    return x, w1, w2


def grads(fn, x, w1, w2, g):
    """Output and input/weight gradients of fn at bf16 copies of (x, w1, w2)."""
    leaves = [t.detach().bfloat16().requires_grad_() for t in (x, w1, w2)]
    y = fn(*leaves)
    y.backward(g.to(y.dtype))
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("slope", [0.5, 0.3])  # MLP_LEAKY_SLOPE: the record's, PR #2140's
@pytest.mark.parametrize("M", [4096, 1000])  # 1000: rows not a multiple of the 128-row tile
def test_fused_mlp_matches_fp32_reference_as_well_as_unfused_bf16(M, slope):
    x, w1, w2 = mlp_inputs(M)
    g = torch.randn(M, 512, device="cuda")
    ref = [mlp_ref(x, w1, w2, slope)]
    ref[0].backward(g)
    ref += [x.grad, w1.grad, w2.grad]
    fused = grads(lambda *a: tg.FusedMLP.apply(*a, slope), x, w1, w2, g)
    plain = grads(lambda *a: mlp_ref(*a, slope), x, w1, w2, g)
    for name, r, f, p in zip(("out", "dx", "dw1", "dw2"), ref, fused, plain):
        assert rel(f, r) < 1.5 * rel(p, r) + 1e-3, (name, rel(f, r), rel(p, r))


def test_fused_mlp_with_frozen_weights_returns_only_the_input_gradient():
    """LoRA TTT freezes the base weights: the kernel's backward then skips dW1 and dW2."""
    x, w1, w2 = mlp_inputs(512)
    g = torch.randn(512, 512, device="cuda")
    xb = x.detach().bfloat16().requires_grad_()
    w1b, w2b = w1.detach().bfloat16(), w2.detach().bfloat16()
    tg.FusedMLP.apply(xb, w1b, w2b, 0.5).backward(g.bfloat16())
    ref = grads(mlp_ref, x, w1, w2, g)[1]
    assert w1b.grad is None and w2b.grad is None and rel(xb.grad, ref) < 1e-2


def test_compiled_training_mlp_uses_the_fused_kernel_and_matches_eval():
    h = tg.load_config({})
    mlp = tg.MLP(h).cuda()
    with torch.no_grad():
        mlp.proj.weight.normal_(0, 0.02)
    n = torch.randn(2, 640, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = (1 + torch.randn(512, device="cuda")).requires_grad_()  # folded into proj
    assert tg.use_fused_mlp(n, 2048)
    out = []
    for fn in (torch.compile(mlp, fullgraph=True, dynamic=False), mlp):  # compiled, then eager
        n.grad = mlp.fc.weight.grad = scale.grad = None
        y = fn(n, scale)
        y.float().square().sum().backward()
        out.append((y, n.grad, mlp.fc.weight.grad, scale.grad))
    with torch.no_grad():
        assert not tg.use_fused_mlp(n, 2048)  # eval and GPTQ hooks take the plain ops
        y_eval = mlp(n, scale)
    assert rel(out[0][0], y_eval) < 1e-2
    for a, b in zip(*out):  # the compiled graph runs the same kernels as the eager call
        assert rel(a, b) < 1e-3 and b.norm() > 0


def test_flex_with_tuned_options_matches_sdpa_forward_and_backward():
    torch.manual_seed(0)
    idx = torch.randint(4, 100, (1, 4096), device="cuda")
    idx[torch.rand_like(idx, dtype=torch.float) < 1 / 700] = 1
    seg = tg.segment_ids(idx, 1, 2048)
    q = torch.randn(1, 4096, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4096, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    g = torch.randn_like(q)
    out = []
    for backend, s in (("flex", tg.flex_doc_mask(seg)), ("sdpa", seg)):
        for t in (q, k, v):
            t.grad = None
        y = tg.attention(q, k, v, s, backend)
        y.backward(g)
        out.append([y, q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *out):
        assert rel(a, b) < 2e-2, (name, rel(a, b))


def plain_softcap_nll(logits, targets, softcap=30.0):
    z = softcap * torch.tanh(logits.float() / softcap)
    return F.cross_entropy(z, targets, reduction="none")


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_softcap_ce_matches_plain_forward_and_backward(compiled):
    torch.manual_seed(0)
    logits = (torch.randn(1000, 8192, device="cuda") * 20).bfloat16()
    targets = torch.randint(0, 8192, (1000,), device="cuda")
    g = torch.rand(1000, device="cuda")
    ref = logits.float().requires_grad_()
    plain_softcap_nll(ref, targets).backward(g)
    fn = torch.compile(tg.SoftcapCE.apply, fullgraph=True) if compiled else tg.SoftcapCE.apply
    x = logits.clone().requires_grad_()
    assert tg.use_fused_kernels(x)
    nll = fn(x, targets, 30.0)
    nll.backward(g)
    assert nll.dtype == torch.float32
    assert rel(nll, plain_softcap_nll(logits, targets)) < 1e-5
    assert x.grad.dtype == torch.bfloat16 and rel(x.grad, ref.grad) < 1e-2


def test_model_loss_uses_fused_ce_when_taking_gradients():
    hidden = torch.randn(1, 512, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(8192, 512, device="cuda") * 0.05
    targets = torch.randint(0, 8192, (1, 512), device="cuda")
    fused = tg.softcap_nll(hidden, weight, targets, tg.LOGIT_SOFTCAP)
    with torch.no_grad():
        plain = tg.softcap_nll(hidden, weight, targets, tg.LOGIT_SOFTCAP)
    assert fused.shape == plain.shape == targets.shape and rel(fused, plain) < 1e-5
    assert "SoftcapCE" in type(fused.grad_fn.next_functions[0][0]).__name__  # under the view_as


def test_scheduled_spans_compile_nothing_after_the_warmup():
    """TRAIN_SEQ_SCHEDULE: compile_warmup runs every span (loop off and on), so training steps at
    any span, as train() switches them, compile no further graph."""
    d = tg.Dist(0, 1, 0, torch.device("cuda"))
    h = tg.load_config({"TRAIN_BATCH_TOKENS": str(8 * 16384), "WARMUP_STEPS": "2",
                        "TRAIN_SEQ_SCHEDULE": "1024@0.3,2048@1.0"})
    torch._dynamo.reset()
    model = tg.GPT(h, 1, tg.pick_attention_backend(d.device)).cuda()
    tg.compile_model(model)
    tg.compile_warmup(model, h, d, h.slot_tokens)
    before, gen = tg.compiled_graphs(), torch.Generator().manual_seed(7)
    for looping in (False, True):
        for span in (1024, 2048, 1024):
            model.looping, model.seq_len = looping, span
            tg.forward_backward(model, tg.synthetic_batches(h, d, 1, gen))
    assert tg.compiled_graphs() == before
    torch._dynamo.reset()
