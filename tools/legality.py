"""Legality self-test of train_gpt.py's evaluation (Issue #1017 conditions C1-C4), on CPU.

    python tools/legality.py                               # exit 0 only if every check passes
    python tools/legality.py --variant leaky-smear         # negative controls: each must fail
    python tools/legality.py --variant score-after-update
    python tools/legality.py --variant prequant-ttt
    python tools/legality.py --variant tilt-reads-target

A tiny model whose every parameter is random (so zero-initialized gates cannot hide a leak)
scores synthetic documents through the real eval functions of train_gpt.py: eval_sliding and
ttt_eval (LoRA adapters, SmearGate, length buckets, phased global SGD), each run by
train_gpt.evaluate with its ledger, each
also with the token n-gram tilt on (NGRAM_BOOST; order 2 here, so hints fire on random tokens). Per-target NLLs are read off train_gpt.account, which every
eval calls with the targets it scores.

  C1 causal        Change token t. Every score fixed before t was revealed must not move: the
                   targets scored at an earlier ledger clock, and those of the same scoring event
                   that precede t in the stream. Checked in scoring order, so it covers the
                   longest-first TTT queue and the phases.
  C1 own token     The distribution that scores token t must not depend on t: the perturbed
                   run's score of the substitute token equals the NLL the base run's
                   distribution gave that same substitute (recorded by the probe).
  C1 doc isolation Change a token of doc N: no target of any other document may move. This holds
                   for sliding windows and for plain LoRA TTT (no phases, A redrawn per batch).
                   It does NOT hold, legally, with phased global SGD (it trains the base model on
                   already-scored docs, which then scores later batches) or with warm-started A
                   (A carries over from already-scored docs in the same batch slot): both move
                   information only from scored documents to documents scored later, which C1
                   in scoring order allows and the C1 causal row checks.
  C2 normalized    At sampled positions of every forward, the head (model.nll, the function
                   GPT.forward calls) gives the NLL of every vocab id: logsumexp(-nll) must be 0,
                   and the returned score must be the realized token's entry. With the tilt on,
                   at least one probed position must carry a hint (else the check is vacuous).
  C3, C4           The ledger the pipeline wrote: each update only after the scores of the doc
                   prefix it consumed; each target scored exactly once.

Variants (illegal pipelines built here, from the outside, that must make the tool fail):
leaky-smear turns off SmearGate's BOS mask only (attention keeps its document mask);
score-after-update swaps in a TTT chunk step that takes its AdamW step before scoring the chunk;
prequant-ttt runs train_gpt.prequant_ttt (AdamW on val) before every eval;
tilt-reads-target hints each target with its own realized token (the channels #1967 rejected).
"""
import argparse
import contextlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

BOS, VOCAB = 1, 64
CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
TINY = dict(  # the SMOKE preset shrunk further; chunks, windows and phases all stay non-trivial
    SMOKE="1", VOCAB_SIZE=VOCAB, NUM_LAYERS=4, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1,
    ROPE_DIMS=8, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3, TRAIN_SEQ_LEN=64,
    TRAIN_BATCH_TOKENS=8 * 128, VAL_BATCH_TOKENS=1024, EVAL_SEQ_LEN=32, EVAL_STRIDE=8,
    TTT_EVAL_SEQ_LEN=32, TTT_CHUNK_SIZE=8, TTT_BATCH_SIZE=4, TTT_LORA_RANK=2,
    TTT_LORA_LR=0.05, PHASED_TTT_PREFIX_DOCS=8, PHASED_TTT_NUM_PHASES=2,
    GLOBAL_TTT_CHUNK_TOKENS=128, GLOBAL_TTT_BATCH_SEQS=4, GLOBAL_TTT_LR=0.05,
    PREQUANT_TTT_EPOCHS=0, EVAL_BUDGET_SECONDS=1e9, NGRAM_BOOST=0,  # the tilt: TILT below
)
DOC_LENS = (90, 30, 60, 12, 80, 45, 20, 70, 8, 50, 85, 35)  # 3 batches of 4, 2 pauses
VARIANTS = {"none": None, "leaky-smear": "C1", "score-after-update": "C3", "prequant-ttt": "C3",
            "tilt-reads-target": "C1"}
TILT = dict(NGRAM_BOOST=2.625, NGRAM_ORDER=2, NGRAM_THRESHOLD=0.8)
INDEPENDENT = dict(PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=0)
PIPELINES = {  # name -> (eval, config overrides)
    "sliding": ("sliding", {}),
    "LoRA TTT, phased, warm A": ("ttt", {}),
    "LoRA TTT, independent": ("ttt", INDEPENDENT),
    "sliding, n-gram tilt": ("sliding", TILT),
    "LoRA TTT, phased, warm A, tilt": ("ttt", TILT),
    "LoRA TTT, independent, tilt": ("ttt", {**INDEPENDENT, **TILT}),
}


def tiny_config(**over) -> tg.Hyperparameters:
    return tg.load_config({k: str(v) for k, v in {**TINY, **over}.items()})


def random_model(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(h, BOS, "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.looping = h.num_loops > 0
    return model


def synthetic_val(lens=DOC_LENS, seed: int = 0) -> tg.ValData:
    g = np.random.default_rng(seed)
    toks = np.concatenate([np.concatenate([[BOS], g.integers(2, VOCAB, n - 1)]) for n in lens])
    return tg.ValData(torch.from_numpy(toks).long(), torch.from_numpy(g.integers(1, 5, toks.size - 1)), BOS)


def substitute(tokens):
    """The token that perturb() puts in place of each token (another non-BOS id)."""
    return (tokens - 2 + 17) % (VOCAB - 2) + 2


class NormProbe:
    """Wraps model.nll. At one position of every call it scores every vocab id through the same
    function and keeps the worst |logsumexp(-nll)| and |score - nll[realized token]|; at every
    position it keeps the NLL of the substitute token (`alt`, for C1 own token)."""

    def __init__(self, fn):
        self.fn, self.calls, self.worst, self.hinted, self.alt = fn, 0, 0.0, 0, None

    def __call__(self, hidden, weight, targets, softcap, head_delta=None, hint=None, boost=0.0):
        out = self.fn(hidden, weight, targets, softcap, head_delta, hint, boost)
        self.calls += 1
        with torch.no_grad():
            self.alt = self.fn(hidden, weight, substitute(targets), softcap, head_delta, hint, boost)
            b, t, V = self.calls % hidden.size(0), (7 * self.calls) % hidden.size(1), weight.size(0)
            delta = None if head_delta is None else head_delta[b, t].expand(1, V, V)
            h1 = None if hint is None else hint[b, t].expand(1, V)
            self.hinted += 0 if hint is None else int(hint[b, t] >= 0)
            every = self.fn(hidden[b, t].expand(1, V, -1), weight, torch.arange(V)[None], softcap, delta, h1,
                            boost)[0]
            gap = (every[targets[b, t]] - out[b, t]).abs().item()
            err = max(torch.logsumexp(-every, 0).abs().item(), gap)
            self.worst = max(self.worst, err)
        return out


@contextlib.contextmanager
def patched(name: str, make):
    """train_gpt.<name> replaced by make(the original) inside the block."""
    real = getattr(tg, name)
    setattr(tg, name, make(real))
    try:
        yield
    finally:
        setattr(tg, name, real)


def keeping_nll(account, probe=None):
    """tg.account that also keeps each scored target's NLL on its ledger, as led.nll, and with a
    probe the NLL its last forward gave the substitute token, as led.alt (C1 own token)."""
    def keep(led, tbytes, nll, idx, scored, rows):
        if not hasattr(led, "nll"):
            led.nll, led.alt = torch.full((led.n,), float("nan")), torch.full((led.n,), float("nan"))
        led.nll[idx[scored].cpu()] = nll.detach()[scored].float().cpu()
        if probe is not None:
            led.alt[idx[scored].cpu()] = probe.alt[scored].float().cpu()
        return account(led, tbytes, nll, idx, scored, rows)
    return keep


def scoring_after_update(_):
    """ILLEGAL on purpose: tg.ttt_chunk with its halves swapped, the AdamW step on the chunk first
    (recorded as such), then the chunk's score with the adapters it just trained."""
    def chunk(model, lora, opt, vd, p, h, led, tilt):
        L = tg.ttt_bucket(int((p["ce"] - p["ws"]).max()), h.ttt_eval_seq_len)
        x, y, idx, scored = tg.window_rows(vd.tokens, p["ws"], p["ce"], p["cs"], h.ttt_batch_size, L)
        if p["step"].any() and opt is not None:
            nll = model(x, y, lora.view(model.compute_dtype), tg.tilt_rows(tilt, idx))
            w = tg.to_device(p["step"].astype(np.float32), nll.device)
            ((nll * scored).sum(1) / scored.sum(1).clamp_min(1) * w).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            led.record("update", np.stack([p["doc"], p["s"], p["ce"]], 1)[p["step"]])
        with torch.no_grad():
            nll = model(x, y, lora.view(model.compute_dtype), tg.tilt_rows(tilt, idx))
        rows = np.stack([p["doc"], p["cs"], p["ce"]], 1)[p["live"]]
        return tg.account(led, vd.target_bytes, nll, idx, scored, rows)
    return chunk


def run(pipeline: str, val: tg.ValData, variant: str, probe: bool = False):
    """One full eval of `val` on a fresh random model through tg.evaluate; returns its ledger
    (per-target NLLs kept) and the model."""
    kind, over = PIPELINES[pipeline]
    h = tiny_config(**over, **({"PREQUANT_TTT_EPOCHS": 1} if variant == "prequant-ttt" else {}))
    model, quiet = random_model(h), lambda *a, **k: None
    if variant == "leaky-smear":  # the smear no longer stops at BOS; attention still does
        model.bos_id = -1
        model.attention_segments = lambda idx: tg.segment_ids(idx, BOS, h.train_seq_len)
    if variant == "prequant-ttt":
        tg.prequant_ttt(model, val, h, CPU, quiet)
    if probe:
        model.nll = NormProbe(model.nll)
    fn, leds = tg.eval_sliding if kind == "sliding" else tg.ttt_eval, []

    def scored(model, val, h, d, led, log):
        leds.append(led)
        return fn(model, val, h, d, led, log)

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched("account", lambda real: keeping_nll(real, model.nll if probe else None)))
        if variant == "score-after-update":
            stack.enter_context(patched("ttt_chunk", scoring_after_update))
        if variant == "tilt-reads-target":  # each target's hint is its own realized token
            stack.enter_context(patched("ngram_hints", lambda real: lambda v, starts, h: v.tokens[1:].clone()))
        tg.evaluate(kind, scored, model, val, h, CPU, quiet, tg.Timer(CPU.device))
    return leds[0], model


def perturb(val: tg.ValData, t: int) -> tg.ValData:
    tokens = val.tokens.clone()
    tokens[t] = substitute(tokens[t])
    return tg.ValData(tokens, val.target_bytes, BOS)


def doc_of(val: tg.ValData) -> torch.Tensor:
    starts, _ = tg.find_docs(val.tokens, BOS)
    return torch.from_numpy(np.searchsorted(starts, np.arange(val.num_targets), side="right") - 1)


def clocks(led: tg.ScoreLedger) -> torch.Tensor:
    return tg.score_clocks(led)[1]


def causal_positions(val: tg.ValData) -> list:
    """Tokens in the middle of a non-final chunk: in the first (phase-prefix) batch, in the second
    batch, and the last token of a document that another follows."""
    starts, ends = tg.find_docs(val.tokens, BOS)
    return [int(starts[0]) + 20, int(starts[5]) + 11, int(ends[4]) - 1]


def check_causal(pipeline: str, val: tg.ValData, variant: str, base) -> list:
    """C1 in scoring order: scores fixed before token t was revealed do not move; and the score
    of t itself comes from a distribution that did not read t (C1 own token)."""
    clk, moved, own, n = clocks(base), 0, 0, len(causal_positions(val))
    for t in causal_positions(val):
        led, _ = run(pipeline, perturb(val, t), variant)
        i = torch.arange(val.num_targets)
        c = clk[t - 1]
        fixed = (clk < c) | ((clk == c) & (i < t - 1))
        if torch.equal(led.nll, base.nll) or torch.isnan(base.alt[t - 1]):
            return [("C1 causal", pipeline, False, f"perturbing token {t} changed nothing (vacuous check)")]
        moved += int((led.nll[fixed] != base.nll[fixed]).sum())
        own += int(led.nll[t - 1] != base.alt[t - 1])
    return [("C1 causal", pipeline, moved == 0, f"{moved} fixed scores moved over {n} perturbations"),
            ("C1 own token", pipeline, own == 0, f"{own} of {n} perturbed tokens scored by a distribution "
             "that read them")]


def check_isolation(pipeline: str, val: tg.ValData, variant: str, base) -> tuple:
    """Changing a token of doc N moves no score of any other document."""
    starts, ends = tg.find_docs(val.tokens, BOS)
    docs, moved = doc_of(val), 0
    for k, t in ((0, int(ends[0]) - 1), (6, int(starts[6]) + 9)):
        led, _ = run(pipeline, perturb(val, t), variant)
        moved += int((led.nll[docs != k] != base.nll[docs != k]).sum())
    return moved == 0, f"{moved} scores of other documents moved over 2 perturbations"


def run_checks(variant: str = "none") -> list:
    """Rows (condition, pipeline, passed, detail)."""
    val, rows = synthetic_val(), []
    starts, _ = tg.find_docs(val.tokens, BOS)
    for pipeline in PIPELINES:
        base, model = run(pipeline, val, variant, probe=True)
        led_checks = tg.check_ledger(base, starts)
        if "independent" not in pipeline:
            rows += check_causal(pipeline, val, variant, base)
        if "phased" not in pipeline:
            rows.append(("C1 doc isolation", pipeline, *check_isolation(pipeline, val, variant, base)))
        p, tilt = model.nll, "tilt" in pipeline
        rows.append(("C2 normalized", pipeline, p.worst < 1e-4 and (p.hinted > 0 or not tilt),
                     f"{p.calls} forwards probed ({p.hinted} at a hint), worst |logsumexp| or score gap "
                     f"{p.worst:.1e}"))
        rows.append(("C3 score before update", pipeline, led_checks["C3"],
                     f"{led_checks['late_updates']} updates before the scores they used"))
        rows.append(("C4 each target once", pipeline, led_checks["C4"],
                     f"{led_checks['scored']} scores for {val.num_targets} targets"))
    return rows


def print_table(rows: list):
    print(f"{'condition':<24} {'pipeline':<32} result  detail")
    for cond, pipeline, ok, detail in rows:
        print(f"{cond:<24} {pipeline:<32} {'PASS' if ok else 'FAIL':<7} {detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=list(VARIANTS), default="none",
                    help="a deliberately illegal pipeline that must fail (negative control)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (and suffer on a busy CPU)
    rows = run_checks(args.variant)
    print_table(rows)
    failed = sorted({cond.split()[0] for cond, _, ok, _ in rows if not ok})
    if args.variant != "none":
        expect = VARIANTS[args.variant]
        print(f"variant {args.variant}: expected to fail {expect}; failed {failed or 'nothing'} -> "
              f"{'negative control works' if expect in failed else 'NEGATIVE CONTROL DID NOT FIRE'}")
    print("ALL PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
