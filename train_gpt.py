"""Parameter golf, 10 min / 16 MB track: the record stack in one readable file.

  torchrun --standalone --nproc_per_node=8 train_gpt.py   # record run on 8xH100
  torchrun --standalone --nproc_per_node=1 train_gpt.py   # same dynamics, 8 micro-steps per step
  SMOKE=1 python train_gpt.py                              # tiny CPU run on ./data/smoke
  python train_gpt.py --help                               # every env var, default and meaning

Configuration comes only from the env names declared in `Hyperparameters`; the defaults are the
submitted configuration of the best record (CaseOps SP8192, 11L x 512, loop 3-5, LQER, phased TTT),
plus the later levers that measured better here (README, "Defaults past #1855").
"""

import copy
import dataclasses
import difflib
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import brotli
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Optional kernels: attention backends (pick_attention_backend) and Triton (fused MLP and CE).
try:
    from flash_attn_interface import flash_attn_varlen_func  # FlashAttention-3 (Hopper)
except ImportError:
    flash_attn_varlen_func = None
try:  # PyTorch's own FlashAttention-2 varlen kernel (torch >= 2.10; the keywords changed in 2.12)
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_PARAMS = inspect.signature(varlen_attn).parameters
    VARLEN_KW = dict({"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)},
                     **({"enable_gqa": True} if "enable_gqa" in _VARLEN_PARAMS else {}))
except ImportError:
    varlen_attn = None
try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    # compiled on its own too, so eager callers (GPTQ calibration) never materialize T x T scores
    flex_attention_compiled = torch.compile(flex_attention, dynamic=False)
except ImportError:
    BlockMask = flex_attention = flex_attention_compiled = None
try:  # GPU builds of torch ship Triton; CPU builds do not (then the MLP stays unfused)
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton = None

# ------------------------------------------------------------------------------------------------
# Config
# One typed dataclass. Each field is set by the env var of the same name in upper case; a name
# that looks like ours but is not declared is an error (records silently ignored mistyped flags).
# ------------------------------------------------------------------------------------------------


@dataclass
class Hyperparameters:
    # data and run
    data_path: str = "./data/datasets/fineweb10B_sp8192_caseops"  # shards + manifest.json
    tokenizer_path: str = "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"  # the shards' tokenizer
    vocab_size: int = 8192  # must equal the tokenizer's and the manifest's
    run_id: str = ""  # log name logs/<RUN_ID>.txt; empty = time-based
    seed: int = 42  # drives init and the GPTQ calibration draw; the data order is seed-independent
    artifact_dir: str = "."  # where final_model.ptz is written
    smoke: bool = False  # tiny CPU configuration on ./data/smoke (the SMOKE block of --help)
    # schedule
    iterations: int = 20000  # upper bound; the wall clock stops the record run first
    max_wallclock_seconds: float = 600.0  # 0 = no cap, schedule by ITERATIONS instead
    gptq_reserve_seconds: float = 6.0  # cap kept for the Hessians: s on 8 GPUs at 16 calibration batches (training_cap)
    warmup_steps: int = 20  # compile warmup steps per graph variant, untimed, state restored
    warmdown_frac: float = 0.85  # last fraction of training decays the LR linearly...
    min_lr: float = 0.1  # ...to this fraction of the base LR
    train_batch_tokens: int = 786432  # global tokens per optimizer step (8 slots)
    train_seq_len: int = 2048  # longest attention segment in training (the last span); longer docs are cut
    train_seq_schedule: str = ""  # 1024@0.1,2048@0.7,3072@1.0: span L while frac <= f (PR #2014); "" = off
    seq_change_warmup_steps: int = 32  # after a span change the LR ramps linearly over this many steps
    train_log_every: int = 500  # log the train loss at steps 1-5 and every N steps
    val_loss_every: int = 0  # 0 = validate only at the end
    val_batch_tokens: int = 524288  # sliding eval: VAL_BATCH_TOKENS / 8 / EVAL_SEQ_LEN rows per forward
    # model
    num_layers: int = 11  # physical transformer blocks
    model_dim: int = 512  # residual stream width
    num_heads: int = 8  # query heads; head dim = MODEL_DIM / NUM_HEADS
    num_kv_heads: int = 4  # key/value heads (grouped-query attention)
    mlp_mult: int = 4  # MLP hidden width = MLP_MULT * MODEL_DIM
    rope_dims: int = 16  # rotated dims per head (partial RoPE)
    qk_gain_init: float = 5.0  # initial value of the learned per-head query gain
    mlp_leaky_slope: float = 0.5  # negative slope of the MLP's LeakyReLU^2 (PR #2140: 0.3)
    loop_start: int = 3  # layers loop_start..loop_end run num_loops+1 times once looping is on
    loop_end: int = 5  # last looped layer (inclusive)
    num_loops: int = 2  # extra passes over the looped layers; 0 = no loop
    enable_looping_at: float = 0.35  # training fraction that switches the loop on
    parallel_start_layer: int = 8  # physical layers >= this run as two parallel lanes
    gate_window: int = 12  # input channels seen by the smear and sparse/out attention gates
    smear_gate_enabled: bool = True  # SmearGate: add a gated share of the previous token's embedding
    attn_gate: str = "sparse"  # sparse | out | dense | none (one attention output gate)
    attn_backend: str = "auto"  # auto | fa3 | varlen (torch's FA2) | flex | sdpa; same math
    sparse_attn_gate_scale: float = 0.5  # multiplies the sparse gate's logit (PR #1855: 1.0 -> 0.5)
    # optimizer
    matrix_lr: float = 0.026  # Muon LR of the block matrices
    scalar_lr: float = 0.02  # AdamW LR of gains, gates, skip and lane weights
    tied_embed_lr: float = 0.03  # AdamW LR of the tied embedding
    muon_momentum: float = 0.97  # Muon (Nesterov) momentum after the warmup
    muon_momentum_warmup_start: float = 0.92  # Muon momentum at step 0, raised linearly...
    muon_momentum_warmup_steps: int = 1500  # ...to MUON_MOMENTUM over this many steps
    muon_momentum_warmup_frac: float = 0.0  # > 0: over this training fraction instead (record: step 1500 at 0.24)
    muon_wd: float = 0.095  # decoupled weight decay of the Muon matrices
    beta2: float = 0.99  # AdamW beta2 (beta1 and eps are fixed, see ADAM_BETA1)
    adam_wd: float = 0.02  # AdamW weight decay of the small tensors
    embed_wd: float = 0.085  # AdamW weight decay of the tied embedding
    grad_clip_norm: float = 0.3  # on the global (all-rank) gradient norm
    ema_decay: float = 0.9965  # EMA of the weights, copied into the model after training
    ema_warmup: bool = True  # decay min(EMA_DECAY, (1+t)/(10+t)) at update t: short runs forget the init
    # quantization and packing
    gptq_calibration_batches: int = 16  # global batches of 8 training slots for the Hessians
    matrix_bits: int = 6  # attention and MLP matrices
    embed_bits: int = 7  # tied embedding
    attn_clip_sigmas: float = 13.0  # per-row clip edge = k * std(row)
    mlp_clip_sigmas: float = 11.5  # the same for MLP matrices (FIT_TO_CAP may raise it)
    embed_clip_sigmas: float = 14.0  # the same for the tied embedding
    lqer_enabled: bool = True  # low-rank correction of the worst-quantized tensors (LQER, PR #1797)
    lqer_rank: int = 4  # rank of each LQER correction
    lqer_top_k: int = 3  # how many tensors (largest quantization error) get one
    lqer_asym_group: int = 64  # int4 group size of the LQER B factor
    awq_lite_groups: int = 1  # AWQ-lite (PR #1908): this many most salient column groups kept int8; 0 = off
    awq_lite_group_size: int = 64  # columns per AWQ-lite group
    fit_to_cap: bool = True  # over the cap: raise MLP_CLIP_SIGMAS (logged, bounded) and requantize
    save_prequant: bool = False  # also write the EMA float weights + config, final_model.pt (tools/ab.py)
    # evaluation (the score is phased LoRA TTT; see the Evaluation section)
    eval_seq_len: int = 2048  # sliding-window length
    eval_stride: int = 64  # each sliding window after the first scores its last EVAL_STRIDE targets
    sliding_enabled: bool = False  # off: 84-121 s (8xH100) on top of ~480 s of TTT overruns 600 s
    eval_budget_seconds: float = 600.0  # strict eval (artifact load to last score); global SGD is cut to fit
    eval_only: str = ""  # path of a saved artifact: skip training and score it ("" = train)
    ttt_enabled: bool = True  # score with LoRA TTT (else sliding if enabled, else non-overlapping)
    ttt_lora_rank: int = 80  # rank of the per-document LoRA adapters
    ttt_lora_alpha: float = 144.0  # adapter outputs are scaled by alpha / rank
    ttt_lora_lr: float = 1e-4  # AdamW on the adapters, one step per chunk
    ttt_local_lr_mult: float = 1.0  # the adapters' AdamW LR is TTT_LORA_LR times this (PR #1953: 0.75)
    ttt_lora_targets: str = "q,k,v,o,mlp,head"  # adapters that exist per document (PR #1953: k,o,mlp,head)
    ttt_beta2: float = 0.99  # the adapters' AdamW beta2 (beta1 is fixed, see TTT_BETA1)
    ttt_weight_decay: float = 0.5  # the adapters' AdamW weight decay
    ttt_chunk_size: int = 48  # tokens of each document scored, then trained on, per step
    ttt_chunk_schedule: str = ""  # LEN:CHUNK,...: chunk by the batch's longest doc (PR #2014: 256:8,2000:24)
    ttt_eval_seq_len: int = 2048  # context window ending at each chunk end; global SGD row length
    ttt_batch_size: int = 64  # documents per batch, one adapter set each
    ttt_warm_start_a: bool = True  # A keeps its trained value across batches of a phase (B restarts at 0)
    phased_ttt_prefix_docs: int = 2500  # docs, in scoring order, that the global SGD phases train on
    phased_ttt_num_phases: int = 3  # pause at floor(P*(i+1)/K) scored docs; 0 = plain LoRA TTT
    global_ttt_lr: float = 0.001  # SGD on every base weight during a pause, cosine over chunks
    global_ttt_chunk_tokens: int = 32768  # one SGD step per chunk; the last chunk is skipped
    global_ttt_batch_seqs: int = 32  # rows per micro-batch, all ranks together
    prequant_ttt_epochs: int = 0  # ILLEGAL (C3) research mode: AdamW on val before quantization
    prequant_ttt_lr: float = 5e-4  # its peak LR, cosine over epochs (PR #1738 default)
    ngram_boost: float = 2.625  # token n-gram tilt of sliding/TTT scores (PR #2140); 0 = off
    ngram_order: int = 16  # the tilt's context: the previous NGRAM_ORDER - 1 tokens of the document
    ngram_threshold: float = 0.8  # hint when the context's top next token has this share of its uses
    env_overrides: ClassVar[dict] = {}  # set by load_config: {ENV_NAME: raw} of the declared names set

    def __post_init__(self):
        if not self.run_id:
            self.run_id = time.strftime("run_%Y%m%d_%H%M%S")
        if self.attn_gate not in ("sparse", "out", "dense", "none"):
            raise ValueError(f"ATTN_GATE={self.attn_gate!r}: use sparse, out, dense or none")
        if self.attn_backend not in ("auto", "fa3", "varlen", "flex", "sdpa"):
            raise ValueError(f"ATTN_BACKEND={self.attn_backend!r}: use auto, fa3, varlen, flex or sdpa")
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("MODEL_DIM must divide by NUM_HEADS, NUM_HEADS by NUM_KV_HEADS")
        if self.train_batch_tokens % 8 or (self.train_batch_tokens // 8) % 128:
            raise ValueError("TRAIN_BATCH_TOKENS must be 8 slots of a multiple of 128 tokens")
        if not 0 <= self.muon_momentum_warmup_frac < 1:
            raise ValueError(f"MUON_MOMENTUM_WARMUP_FRAC={self.muon_momentum_warmup_frac}: use 0 (steps) or a "
                             "fraction in (0, 1)")
        parse_seq_schedule(self.train_seq_schedule, self.train_seq_len)  # raises on a bad spec
        if self.eval_stride >= self.eval_seq_len or self.ttt_chunk_size > self.ttt_eval_seq_len:
            raise ValueError("need EVAL_STRIDE < EVAL_SEQ_LEN and TTT_CHUNK_SIZE <= TTT_EVAL_SEQ_LEN")
        if not set(lora_targets(self)) <= set(LORA_TARGETS):
            raise ValueError(f"TTT_LORA_TARGETS={self.ttt_lora_targets!r}: a comma list of "
                             f"{','.join(LORA_TARGETS)}, or empty for no adapters")
        if self.ttt_local_lr_mult < 0:
            raise ValueError(f"TTT_LOCAL_LR_MULT={self.ttt_local_lr_mult}: must be >= 0 (scales TTT_LORA_LR)")
        if self.ngram_boost < 0 or self.ngram_order < 2 or not 0 < self.ngram_threshold <= 1:
            raise ValueError(f"NGRAM_BOOST={self.ngram_boost}, NGRAM_ORDER={self.ngram_order}, "
                             f"NGRAM_THRESHOLD={self.ngram_threshold}: need BOOST >= 0 (0 = off), "
                             "ORDER >= 2, 0 < THRESHOLD <= 1")
        width = self.lqer_rank * self.model_dim  # every LQER B factor is rank x a multiple of this
        if self.lqer_enabled and (self.lqer_asym_group < 1 or width % self.lqer_asym_group):
            raise ValueError(f"LQER_ASYM_GROUP={self.lqer_asym_group} must divide LQER_RANK x MODEL_DIM = "
                             f"{width} (the LQER B factors split into these groups)")
        if self.awq_lite_groups < 0 or self.awq_lite_group_size < 1:
            raise ValueError(f"AWQ_LITE_GROUPS={self.awq_lite_groups}, AWQ_LITE_GROUP_SIZE="
                             f"{self.awq_lite_group_size}: need GROUPS >= 0 (0 = off), GROUP_SIZE >= 1")
        if any(not 0 < c <= self.ttt_eval_seq_len for _, c in chunk_schedule(self.ttt_chunk_schedule)):
            raise ValueError(f"TTT_CHUNK_SCHEDULE={self.ttt_chunk_schedule!r}: chunks in 1..TTT_EVAL_SEQ_LEN")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def seq_plan(self) -> list:  # [(frac, span)] of TRAIN_SEQ_SCHEDULE; empty = TRAIN_SEQ_LEN throughout
        return parse_seq_schedule(self.train_seq_schedule, self.train_seq_len)

    @property
    def score_seq_len(self) -> int:  # attention span of every scoring forward: longer eval windows see all
        return max(self.train_seq_len, self.eval_seq_len, self.ttt_eval_seq_len)

    @property
    def slot_tokens(self) -> int:  # tokens per micro-batch (one of the 8 slots of a step)
        return self.train_batch_tokens // 8

    def config_hash(self, data_identity: str = "") -> str:  # same for every seed, data, any machine
        cfg = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_HASHED}
        cfg["data"] = data_identity
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# Left out of the config hash: seed and run_id (one configuration, many seeds); paths, since the
# data enters by its manifest identity (data_path, tokenizer_path, artifact_dir, eval_only); and
# knobs that only log or write (train_log_every, val_loss_every, save_prequant).
NOT_HASHED = ("seed", "run_id", "data_path", "tokenizer_path", "artifact_dir", "eval_only",
              "train_log_every", "val_loss_every", "save_prequant")
# Every field in exactly one class (a test enforces it), for self-describing artifacts:
# ARCH_FIELDS shape the model or what its weights went through: EVAL_ONLY takes them from the
# artifact and an env var that disagrees is an error. EVAL_FIELDS shape the eval: the artifact's
# value is the default, an env var may override it (logged). RUN_FIELDS are not stored: training,
# quantization, paths, logging, machine choices (ATTN_BACKEND: same math).
ARCH_FIELDS = (
    "mlp_leaky_slope", "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
    "rope_dims",
    "loop_start", "loop_end", "num_loops", "parallel_start_layer", "gate_window", "smear_gate_enabled",
    "attn_gate", "sparse_attn_gate_scale",
    "train_seq_len",  # attention segments are cut every TRAIN_SEQ_LEN tokens
    "prequant_ttt_epochs",  # an artifact trained on val stays stamped non-compliant
)
EVAL_FIELDS = (
    "seed",  # TTT draws its LoRA A from it
    "train_batch_tokens",  # the diagnostic eval's window is one training slot
    "val_batch_tokens", "eval_seq_len", "eval_stride", "sliding_enabled", "eval_budget_seconds",
    "ttt_enabled", "ttt_lora_rank", "ttt_lora_alpha", "ttt_lora_lr", "ttt_beta2", "ttt_weight_decay",
    "ttt_local_lr_mult", "ttt_lora_targets", "ttt_chunk_schedule",
    "ttt_chunk_size", "ttt_eval_seq_len", "ttt_batch_size", "ttt_warm_start_a", "phased_ttt_prefix_docs",
    "phased_ttt_num_phases", "global_ttt_lr", "global_ttt_chunk_tokens", "global_ttt_batch_seqs",
    "ngram_boost", "ngram_order", "ngram_threshold",
)
RUN_FIELDS = (
    "train_seq_schedule", "seq_change_warmup_steps",
    "ema_warmup", "muon_momentum_warmup_frac",
    "data_path", "tokenizer_path", "run_id", "artifact_dir", "smoke", "iterations", "max_wallclock_seconds",
    "gptq_reserve_seconds", "warmup_steps", "warmdown_frac", "min_lr", "train_log_every", "val_loss_every",
    "qk_gain_init", "enable_looping_at", "attn_backend", "matrix_lr", "scalar_lr", "tied_embed_lr",
    "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps", "muon_wd", "beta2",
    "adam_wd", "embed_wd", "grad_clip_norm", "ema_decay", "gptq_calibration_batches", "matrix_bits",
    "embed_bits", "attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas",
    "lqer_enabled", "lqer_rank", "lqer_top_k", "lqer_asym_group", "awq_lite_groups", "awq_lite_group_size",
    "fit_to_cap",
    "save_prequant", "eval_only", "prequant_ttt_lr",
)


# A tiny configuration that exercises every feature on a CPU in about a minute.
SMOKE_PRESET = dict(
    data_path="./data/smoke", tokenizer_path="./data/smoke/smoke_caseops_1024.model",
    vocab_size=1024, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
    loop_start=2, loop_end=3, parallel_start_layer=4, train_batch_tokens=8 * 512,
    train_seq_len=256, iterations=40, max_wallclock_seconds=0.0, warmup_steps=1,
    train_log_every=5, val_batch_tokens=4096, gptq_reserve_seconds=0.0, ema_decay=0.9,
    gptq_calibration_batches=2,
    eval_seq_len=128, sliding_enabled=True, ttt_lora_rank=4, ttt_chunk_size=32,
    ttt_eval_seq_len=128, ttt_batch_size=8, phased_ttt_prefix_docs=16, phased_ttt_num_phases=2,
    global_ttt_chunk_tokens=2048, global_ttt_batch_seqs=8,
    eval_budget_seconds=1e6,  # a slow or busy CPU must not cut global SGD (the score would vary)
)
# Fixed here: no record of the lineage varied them (spec section 8 and the records it cites).
ROPE_BASE = 10000.0
LOGIT_SOFTCAP = 30.0  # logits = c * tanh(logits / c)
TIED_EMBED_INIT_STD = 0.005
MUON_BACKEND_STEPS = 5  # Polar Express iterations per Muon update
ADAM_BETA1, ADAM_EPS = 0.9, 1e-8
GPTQ_BLOCK_SIZE, GPTQ_DAMP = 128, 0.01  # columns per GPTQ block; damping, times mean(diag(H))
TTT_BETA1 = 0.0  # the LoRA adapters' AdamW beta1
GLOBAL_TTT_MOMENTUM, GLOBAL_TTT_EPOCHS, GLOBAL_TTT_GRAD_CLIP = 0.9, 1, 1.0  # SGD of the TTT pauses


def fixed(value) -> str:
    return f"nothing: fixed at {value!r} here (no record varied it)"


# Env names of earlier record scripts (baseline 03-11 to PR #1855), each with what replaces it.
RENAMED = {name: use for use, names in (
    ("ATTN_GATE=sparse", "SPARSE_ATTN_GATE_ENABLED"), ("ATTN_GATE=dense", "GATED_ATTN_ENABLED"),
    ("ATTN_GATE=out", "ATTN_OUT_GATE_ENABLED GATE_ATTN_OUT"), ("SMEAR_GATE_ENABLED", "SMEAR_GATE"),
    ("ATTN_GATE (sparse | out | dense | none)", "GATED_ATTENTION"),
    ("GATE_WINDOW", "GATE_WIDTH SMEAR_GATE_WIDTH"), ("nothing: the data manifest decides", "CASEOPS_ENABLED"),
    ("EVAL_ONLY", "TTT_EVAL_ONLY EVAL_ONLY_PATH"), ("SLIDING_ENABLED", "SLIDING_WINDOW_ENABLED"),
    ("PREQUANT_TTT_EPOCHS", "PREQ_TTT_EPOCHS"), ("PARALLEL_START_LAYER", "PARALLEL_RESIDUAL_START"),
    ("TTT_LORA_TARGETS (a comma list of q,k,v,o,mlp,head)",
     "TTT_Q_LORA TTT_K_LORA TTT_V_LORA TTT_O_LORA TTT_MLP_LORA"),
    ("TTT_LORA_TARGETS (no_qv = k,o,mlp,head)", "TTT_MASK"),
    ("TTT_CHUNK_SCHEDULE (LEN:CHUNK pairs, e.g. 256:8,2000:24)",
     "TTT_SHORT_SCORE_FIRST_STEPS TTT_SHORT_CHUNK_SIZE TTT_SHORT_DOC_LEN"),
    ("TTT_CHUNK_SCHEDULE (empty = off)", "TTT_SHORT_SCORE_FIRST_ENABLED"),
    ("nothing: one step per chunk", "TTT_GRAD_STEPS"), ("nothing: AdamW only", "TTT_OPTIMIZER"),
    ("nothing: documents are always kept apart", "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES"),
    ("DATA_PATH and TOKENIZER_PATH (full paths)", "DATA_DIR"),
    ("VAL_BATCH_TOKENS", "VAL_BATCH_SIZE"), ("WARMDOWN_FRAC", "WARMDOWN_ITERS"),
    ("TIED_EMBED_LR (the embedding is tied to the head)", "EMBED_LR HEAD_LR"),
    ("nothing: the embedding is always tied", "TIE_EMBEDDINGS"),
    ("nothing: the embedding width is MODEL_DIM", "EMBEDDING_DIM"),
    ("nothing: XSA runs on every layer", "XSA_LAST_N"),
    ("nothing: the 1/sqrt(layer+1) norm scale is always on", "LN_SCALE"),
    ("nothing: the U-Net skips are always gated", "SKIP_GATES_ENABLED"),
    ("nothing: RoPE positions are never rescaled", "ROPE_TRAIN_SEQ_LEN ROPE_YARN"),
    ("nothing: TRAIN_SEQ_SCHEDULE follows the training fraction, as the LR", "TRAIN_SEQ_SCHEDULE_MODE"),
    ("nothing: the final norm reads the mean of the two lanes", "PARALLEL_FINAL_LANE"),
    ("nothing: lane 1 starts before the first U-Net skip merge, as the record (no bench showed ours "
     "better)", "PARALLEL_LANE1_SKIP"),
    ("nothing: the fused CE runs whenever gradients are taken on a GPU", "FUSED_CE_ENABLED"),
    ("nothing: the sparse gate starts at 0, the dense one at std 0.005",
     "SPARSE_ATTN_GATE_INIT_STD GATED_ATTN_INIT_STD"),
    ("nothing: ATTN_GATE=out reads the attention input", "ATTN_OUT_GATE_SRC GATE_ATTN_SRC"),
    ("nothing: the SmearGate BOS mask is always on", "SMEAR_GATE_BOS_FIX"),
    ("nothing: attention gate weights are always int8 per row", "GATED_ATTN_QUANT_GATE"),
    ("nothing: tensors that are not block matrices go to AdamW", "CONTROL_TENSOR_NAME_PATTERNS"),
    ("nothing: MuonEq-R row normalization is always on", "MUON_ROW_NORMALIZE"),
    ("AWQ_LITE_GROUPS (0 = off; PR #1908: 1)", "AWQ_LITE_ENABLED AWQ_LITE_GROUP_TOP_K"),
    ("nothing: AWQ-lite groups are int8", "AWQ_LITE_BITS"),
    ("nothing: no tensor reached its class (GPTQ'd matrices are attention, MLP or the embedding: "
     "ATTN_CLIP_SIGMAS, MLP_CLIP_SIGMAS, EMBED_CLIP_SIGMAS)", "MATRIX_CLIP_SIGMAS"),
    ("nothing: LQER is always asymmetric (A int2, B int4 in LQER_ASYM_GROUP groups)",
     "LQER_ASYM_ENABLED LQER_FACTOR_BITS"),
    ("nothing: GPTQ always runs", "GPTQ_ENABLED"), ("EMA_DECAY (EMA is always on)", "EMA_ENABLED"),
    ("nothing: the model is always brotli-11 (lzma -9 was 7% larger)", "COMPRESSOR"),
    ("EMA_DECAY (EMA replaced SWA and LAWA)", "SWA_ENABLED SWA_EVERY LAWA_ENABLED LAWA_K LAWA_FREQ"),
    ("nothing: no QAT here (GPTQ after training)", "QAT_ENABLED LATE_QAT_THRESHOLD"),
    ("nothing: every val document is scored", "VAL_TOKENS VAL_DOC_FRACTION TTT_EVAL_BATCHES"),
    ("TTT_LORA_* and GLOBAL_TTT_* (LoRA TTT with global SGD replaced chunk SGD TTT)",
     "TTT_LR TTT_EPOCHS TTT_MOMENTUM TTT_CHUNK_TOKENS TTT_FREEZE_BLOCKS TTT_BATCH_SEQS TTT_GRAD_CLIP"),
    ("nothing: no LR warmup in the global SGD", "GLOBAL_TTT_WARMUP_CHUNKS GLOBAL_TTT_WARMUP_START_LR"),
    ("EVAL_ONLY with the artifact of a SAVE_PREQUANT=1 run", "PREQUANT_ONLY"),
    ("nothing: not supported here", "BIGRAM_VOCAB_SIZE BIGRAM_DIM VE_ENABLED VE_DIM VE_LAYERS "
     "MTP_NUM_HEADS MTP_LOSS_WEIGHT MUON_BETA2 DTG_ENABLED VALUE_RESIDUAL TTT_OUTPUT_DIR"),
    ("NGRAM_BOOST (0 = off; PR #2140: 2.625)", "NGRAM_TILT_ENABLED TOKEN_BOOST"),
    ("nothing: AsymLogit (PR #1923) measured no effect here and was removed (bench/RESULTS.md, "
     "2026-12-06); the softcap is LOGIT_SOFTCAP", "ASYM_LOGIT_RESCALE"),
    ("NGRAM_ORDER", "TOKEN_ORDER"), ("NGRAM_THRESHOLD", "TOKEN_THRESHOLD"),
    ("nothing: only the token channel (#1967: the others read the scored token, C1)",
     "WITHIN_TAU WITHIN_BOOST WORD_ORDER WORD_NORMALIZE WORD_TAU WORD_BOOST"),
    ("nothing: run `python data/prepare.py disjoint DATA_PATH` (data/prepare.py and data/download.py "
     "check it when they build the data)", "CHECK_DISJOINT"),
    (fixed(ROPE_BASE), "ROPE_BASE"), (fixed(LOGIT_SOFTCAP), "LOGIT_SOFTCAP"),
    (fixed(TIED_EMBED_INIT_STD), "TIED_EMBED_INIT_STD"), (fixed(MUON_BACKEND_STEPS), "MUON_BACKEND_STEPS"),
    (fixed(ADAM_BETA1), "BETA1"), (fixed(ADAM_EPS), "ADAM_EPS"), (fixed(GPTQ_BLOCK_SIZE), "GPTQ_BLOCK_SIZE"),
    (fixed(GPTQ_DAMP), "GPTQ_DAMP"), (fixed(TTT_BETA1), "TTT_BETA1"),
    (fixed(GLOBAL_TTT_MOMENTUM), "GLOBAL_TTT_MOMENTUM"), (fixed(GLOBAL_TTT_EPOCHS), "GLOBAL_TTT_EPOCHS"),
    (fixed(GLOBAL_TTT_GRAD_CLIP), "GLOBAL_TTT_GRAD_CLIP"),
) for name in names.split()}
RETIRED_PREFIXES = {"ETLB_": "nothing: not supported here", "WD_TAPER_": "nothing: weight decay is constant"}
OUR_PREFIXES = (
    "TTT_", "GPTQ_", "LQER_", "MUON_", "PHASED_", "GLOBAL_TTT_", "SMEAR_", "ATTN_", "EMBED_",
    "TIED_", "LOOP_", "PARALLEL_", "QK_", "ROPE_", "EVAL_", "VAL_", "TRAIN_", "MLP_", "GATED_",
    "SPARSE_", "EMA_", "WARMDOWN_", "MATRIX_", "SCALAR_", "ADAM_", "NUM_LAYERS", "NUM_LOOPS",
    "SLIDING_", "PREQUANT_", "AWQ_", "NGRAM_",
)


def parse_seq_schedule(spec: str, final: int) -> list:
    """TRAIN_SEQ_SCHEDULE "L1@f1,...,Ln@1.0" -> [(f1, L1), ...]: span L_i while the training
    fraction is <= f_i. Fractions rise to 1.0 and the last span is TRAIN_SEQ_LEN, the model's own."""
    if not spec:
        return []
    try:
        plan = [(float(f), int(n)) for n, f in (part.split("@") for part in spec.split(","))]
    except ValueError:
        raise ValueError(f"TRAIN_SEQ_SCHEDULE={spec!r}: expected span@frac,... (1024@0.1,2048@1.0)") from None
    fracs = [f for f, _ in plan]
    if fracs != sorted(set(fracs)) or fracs[0] <= 0 or fracs[-1] != 1 or min(n for _, n in plan) < 1:
        raise ValueError(f"TRAIN_SEQ_SCHEDULE={spec!r}: fractions must rise to exactly 1.0, spans be >= 1")
    if plan[-1][1] != final:
        raise ValueError(f"TRAIN_SEQ_SCHEDULE={spec!r} must end with TRAIN_SEQ_LEN ({final}): set both")
    return plan


def chunk_schedule(spec: str) -> list:
    """TTT_CHUNK_SCHEDULE "256:8,2000:24" -> [(256, 8), (2000, 24)], by length."""
    try:
        pairs = (item.split(":") for item in spec.split(",") if item.strip())
        return sorted((int(n), int(c)) for n, c in pairs)
    except ValueError:
        raise ValueError(f"TTT_CHUNK_SCHEDULE={spec!r}: use LEN:CHUNK pairs, e.g. 256:8,2000:24") from None


LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")  # the TTT_LORA_TARGETS names


def lora_targets(h) -> list:
    return [t.strip() for t in h.ttt_lora_targets.split(",") if t.strip()]


def parse_env_value(raw: str, typ, name: str):
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}={raw!r}: expected 0/1")
    try:
        return typ(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected {typ.__name__}") from None


def typo_of(key: str, names) -> str | None:
    """The declared name `key` is a typo of: nearly the same string, or the same words with one of
    them misspelt (MATRIX_LRR -> MATRIX_LR). A shared suffix is not enough (GPTQ_ENABLED is not
    TTT_ENABLED)."""
    words = key.split("_")
    for name in names:
        if difflib.SequenceMatcher(None, key, name).ratio() >= 0.9:
            return name
        diff = [(a, b) for a, b in zip(words, name.split("_")) if a != b]
        if len(name.split("_")) == len(words) and len(diff) == 1 and \
                difflib.SequenceMatcher(None, *diff[0]).ratio() >= 0.75:
            return name
    return None


def load_config(environ=None) -> Hyperparameters:
    """Build the config from declared env names; refuse names of older records and names that look
    like ours but are not declared."""
    environ = os.environ if environ is None else environ
    fields = {f.name.upper(): f for f in dataclasses.fields(Hyperparameters)}
    values, declared = {}, {}
    for key, raw in environ.items():
        retired = RENAMED.get(key) or next((v for p, v in RETIRED_PREFIXES.items() if key.startswith(p)), None)
        if key in fields:
            values[fields[key].name], declared[key] = parse_env_value(raw, fields[key].type, key), raw
        elif retired:
            raise ValueError(f"env {key} (an older record's name) is not read by this script; use {retired}")
        elif key.startswith(OUR_PREFIXES) or typo_of(key, fields):
            close = typo_of(key, fields)
            hint = f" (did you mean {close}?)" if close else ""
            raise ValueError(f"unknown env var {key}{hint}; `python train_gpt.py --help` lists all")
    if values.get("smoke"):
        values = {**SMOKE_PRESET, **values}
    h = Hyperparameters(**values)
    h.env_overrides = declared
    return h


def config_help() -> str:
    """Every env var with its default and the comment of its field in the source, then what
    SMOKE=1 changes."""
    notes = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source_text(), re.M))
    lines = ["Env vars (NAME = default  # meaning):"]
    for f in dataclasses.fields(Hyperparameters):
        lines.append(f"  {f.name.upper()} = {f.default!r}  # {notes.get(f.name, '?')}")
    lines.append("SMOKE=1 sets these defaults (an env var that is set still wins):")
    lines += [f"  {k.upper()} = {v!r}" for k, v in SMOKE_PRESET.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Distributed setup and logging
# torchrun's RANK/WORLD_SIZE/LOCAL_RANK are the only other env vars read. Gradient accumulation is
# 8 / world size, so 1, 2, 4 or 8 GPUs see the same batches and the same optimizer steps.
# ------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def grad_accum(self) -> int:
        return 8 // self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(h: Hyperparameters) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world:
        raise ValueError(f"WORLD_SIZE={world} (nproc_per_node) must divide 8: use 1, 2, 4 or 8")
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif h.smoke:
        device = torch.device("cpu")
    else:
        raise RuntimeError("no CUDA device found; set SMOKE=1 for the CPU smoke configuration")
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local, device)


class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt; other ranks stay quiet."""

    def __init__(self, run_id: str, enabled: bool):
        self.enabled, self.path = enabled, f"logs/{run_id}.txt"
        if enabled:
            os.makedirs("logs", exist_ok=True)
            open(self.path, "w").close()

    def __call__(self, msg: str = "", console: bool = True):
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


class Timer:
    """The run's one wall clock. `phases`: seconds per named phase, logged and in final_json, so
    reviewers can apply any timing rule they choose. A stopwatch, restarted for the training clock
    and again for the strict eval (against its budget), with pauses left out. Decisions read the
    slowest rank (MAX), so every rank stops, switches or skips on the same step."""

    def __init__(self, device: torch.device, budget: float = math.inf):
        self.device, self.phases = device, {}
        self.restart(budget)

    def restart(self, budget: float = math.inf):
        self.t0, self.paused, self.budget, self.reserve = time.perf_counter(), 0.0, budget, 0.0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:  # this rank's seconds since restart(), pauses left out
        self.sync()
        return time.perf_counter() - self.t0 - self.paused

    def slowest(self, extra: float = 0.0) -> float:  # elapsed (+ extra) of the slowest rank
        t = torch.tensor([self.elapsed() + extra], device=self.device)
        return all_reduce(t, dist.ReduceOp.MAX).item()

    def left(self) -> float:
        """Seconds of the budget left once the `reserve` (work that cannot be cut) is done."""
        return self.budget - self.slowest(self.reserve)

    @contextmanager
    def phase(self, name: str | None, pause: bool = False):
        """Add the block's seconds to phases[name] (None: to no phase); with `pause`, keep them off
        the stopwatch."""
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        dt = time.perf_counter() - t0
        if name:
            self.phases[name] = self.phases.get(name, 0.0) + dt
        self.paused += dt if pause else 0.0


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_reduce_flat(tensors: list) -> list:
    """Sums of many small tensors over ranks in one collective (one flat buffer), as views."""
    flat = all_reduce(torch.cat([t.flatten() for t in tensors]))
    return [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def source_text() -> str:
    """The readable source that is running (a packed launcher passes it in as __source__)."""
    return globals().get("__source__") or open(__file__, encoding="utf-8").read()


def source_sha256() -> str:
    return hashlib.sha256(source_text().encode()).hexdigest()


def banner(msg: str) -> str:
    """A warning no reader of the log can miss."""
    return "!" * 100 + "\n!!! " + msg + "\n" + "!" * 100


def environment_report(d: Dist) -> str:
    lines = [f"python {platform.python_version()} torch {torch.__version__} numpy {np.__version__}"]
    if d.device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(d.device)} x{d.world_size} "
                     f"cuda {torch.version.cuda}")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
        except FileNotFoundError:
            lines.append("nvidia-smi not found")
    else:
        lines.append(f"device: cpu x{d.world_size}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Data and bits-per-byte accounting
# Shards: 256 int32 header (magic, version, count) + uint16 tokens. Documents are BOS + tokens, no
# EOS. The byte denominator comes from the data manifest: the tokenizer's piece table for plain
# SentencePiece data, the per-token sidecar of original UTF-8 bytes for CaseOps data (PR #1729).
# Every val target gets its byte count once, up front, so every eval path divides by the same sum.
# ------------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


class DataError(ValueError):
    pass


def read_shard(path: str) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path}: not a shard (bad magic/version header)")
    n = int(header[2])
    if os.path.getsize(path) != 4 * HEADER_INTS + 2 * n:
        raise DataError(f"{path}: size does not match its header count {n}")
    return np.memmap(path, dtype="<u2", mode="r", offset=4 * HEADER_INTS, shape=(n,))


def token_shards(data_path: str, split: str) -> list:
    """fineweb_<split>_NNNNNN.bin only: the byte sidecar fineweb_val_bytes_* must never match."""
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))
    return [f for f in files if os.path.basename(f)[len(f"fineweb_{split}_"):-4].isdigit()]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_byte_lut(sp, vocab_size: int):
    """Bytes each token adds to the normalized text: (base, has_leading_space, is_boundary).

    A `▁word` piece adds its space only when the previous token is not a boundary (BOS/control),
    since SentencePiece drops the leading space of a document. Byte-fallback pieces are 1 byte.
    """
    base = np.zeros(vocab_size, np.int64)
    space = np.zeros(vocab_size, bool)
    boundary = np.ones(vocab_size, bool)
    for i in range(min(sp.get_piece_size(), vocab_size)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            base[i] = 1
            continue
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise DataError("tokenizer has no standalone '▁' piece; spaces would count 3 bytes")
    return base, space, boundary


def lut_target_bytes(tokens: np.ndarray, lut) -> np.ndarray:
    """Byte count of every target tokens[1:], given its previous token."""
    base, space, boundary = lut
    prev, tgt = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    return base[tgt] + (space[tgt] & ~boundary[prev])


def check_shards(paths: list, entries: list, full: bool) -> None:
    """Shards against their manifest entries: header and size always (cheap: train shards are read
    only later, by the loader thread), and with `full` the sha256 of the whole file (val: a changed
    val byte changes the score)."""
    fix = "rebuild it (data/prepare.py) or download it again (data/download.py)"
    for path, entry in zip(paths, entries):
        try:
            n = read_shard(path).size
        except DataError as e:
            raise DataError(f"{e}: corrupted file? {fix}") from None
        if n != entry["tokens"]:
            raise DataError(f"{path}: {n} tokens, manifest.json says {entry['tokens']}: {fix}")
        if full and sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: sha256 differs from manifest.json (changed after the data was "
                            f"built): {fix}")


@dataclass
class DataSpec:
    variant: str
    byte_source: str  # "lut" | "sidecar"
    bos_id: int
    train_files: list
    val_files: list
    byte_files: list
    manifest_sha256: str
    val_tokens: int
    scored_bytes: int | None  # what the byte source must sum to over the val targets
    identity: str = ""  # manifest_identity(): what the data is, wherever it lives


def manifest_identity(man: dict, train_shards: int) -> str:
    """sha256 of the tokenizer, the val shards and the train shards in use, from the manifest. Not
    the manifest file's hash: its sources and build notes hold local paths."""
    def shards(entries):
        return [[s.get("sha256"), s.get("tokens")] for s in entries]
    tok, val = man["tokenizer"], man["val"]
    core = dict(variant=man["variant"], transform=man.get("text_transform"), bytes=man["byte_source"],
                tokenizer=[tok["sha256"], tok["vocab_size"], tok.get("bos_id", 1)],
                val=[val["tokens"], val.get("scored_bytes"), shards(val["shards"]),
                     shards(val.get("byte_shards", []))],
                train=shards(man["train"]["shards"][:train_shards]))
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def load_data_spec(h: Hyperparameters, val_sha256: bool = True) -> DataSpec:
    """Check shards, tokenizer and manifest agree before any GPU time is spent (`val_sha256`
    off: data/verify.py, which reports a changed val file document by document instead)."""
    mpath = os.path.join(h.data_path, "manifest.json")
    if not os.path.isfile(mpath):
        raise DataError(f"DATA_PATH={h.data_path}: no manifest.json (build it with data/prepare.py "
                        "or data/download.py)")
    man = json.load(open(mpath))
    if man.get("format_version") != 1:
        raise DataError(f"{mpath}: format_version {man.get('format_version')!r}, expected 1")
    tok = man["tokenizer"]
    if not os.path.isfile(h.tokenizer_path):
        raise DataError(f"TOKENIZER_PATH={h.tokenizer_path}: file not found")
    if sha256_file(h.tokenizer_path) != tok["sha256"]:
        raise DataError(f"TOKENIZER_PATH={h.tokenizer_path} is not the tokenizer the shards in "
                        f"{h.data_path} were made with (sha256 differs from manifest.json)")
    if h.vocab_size != tok["vocab_size"]:
        raise DataError(f"VOCAB_SIZE={h.vocab_size} but {mpath} says {tok['vocab_size']}")
    train, val = token_shards(h.data_path, "train"), token_shards(h.data_path, "val")
    byte_files = sorted(glob.glob(os.path.join(h.data_path, "fineweb_val_bytes_[0-9]*.bin")))
    if not train or not val:
        raise DataError(f"DATA_PATH={h.data_path}: no fineweb_train_*.bin or fineweb_val_*.bin")
    names = [os.path.basename(f) for f in train]
    if names != [s["name"] for s in man["train"]["shards"]][:len(names)]:
        raise DataError(f"{h.data_path}: train shards on disk are not a prefix of those listed in "
                        f"manifest.json (foreign or extra files?)")
    listed = [s["name"] for s in man["val"]["shards"]]
    if [os.path.basename(f) for f in val] != listed:
        raise DataError(f"{h.data_path}: val shards on disk {len(val)} differ from manifest {listed}")
    if man["byte_source"] == "sidecar":
        want = [s["name"] for s in man["val"]["byte_shards"]]
        if [os.path.basename(f) for f in byte_files] != want:
            raise DataError(f"{h.data_path}: {man['variant']} data needs its byte sidecar files "
                            f"{want}; found {[os.path.basename(f) for f in byte_files]}")
    elif man["byte_source"] != "lut":
        raise DataError(f"{mpath}: unknown byte_source {man['byte_source']!r}")
    check_shards(train, man["train"]["shards"], full=False)
    check_shards(val + byte_files, man["val"]["shards"] + man["val"]["byte_shards"], full=val_sha256)
    return DataSpec(man["variant"], man["byte_source"], tok.get("bos_id", 1), train, val,
                    byte_files, sha256_file(mpath), man["val"]["tokens"], man["val"].get("scored_bytes"),
                    manifest_identity(man, len(train)))


@dataclass
class ValData:
    """The whole val stream and the byte count of each of its N-1 targets."""
    tokens: torch.Tensor  # int64 [N] on CPU
    target_bytes: torch.Tensor  # int64 [N-1]: bytes of target tokens[i+1]
    bos_id: int

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1


def load_val_data(spec: DataSpec, h: Hyperparameters) -> ValData:
    tokens = np.concatenate([read_shard(f) for f in spec.val_files])
    if tokens.size != spec.val_tokens:
        raise DataError(f"val shards hold {tokens.size} tokens, manifest says {spec.val_tokens}")
    if spec.byte_source == "sidecar":
        side = np.concatenate([read_shard(f) for f in spec.byte_files])
        if side.size != tokens.size:
            raise DataError(f"DATA_PATH={h.data_path}: byte sidecar {spec.byte_files} has "
                            f"{side.size} entries for {tokens.size} val tokens")
        target_bytes = side[1:].astype(np.int64)
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
        target_bytes = lut_target_bytes(tokens, build_byte_lut(sp, h.vocab_size))
    if spec.scored_bytes is not None and int(target_bytes.sum()) != spec.scored_bytes:
        raise DataError(f"DATA_PATH={h.data_path}: val targets score {int(target_bytes.sum())} bytes, "
                        f"manifest.json says {spec.scored_bytes} (corrupt sidecar or changed byte LUT)")
    return ValData(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(target_bytes),
                   spec.bos_id)


def synthetic_tokens(n: int, vocab_size: int, bos_id: int, doc_len: int, gen) -> torch.Tensor:
    """n random ids other than BOS with a BOS every `doc_len`: warms compiled graphs, no data read."""
    t = torch.randint(0, vocab_size - 1, (n,), generator=gen)
    t += (t >= bos_id).long()
    t[::doc_len] = bos_id
    return t


class TrainLoader:
    """Sequential document packing, the same for every world size.

    Each optimizer step consumes one global span of 8 slots of (slot_tokens + 1) tokens from the
    shards in order (inputs = slot[:-1], targets = slot[1:]). Rank r's micro-step i reads slot
    r * grad_accum + i, so 1 and 8 GPUs train on identical batches. A background thread keeps two
    steps ready in pinned memory. The stream starts at the first BOS and wraps after the last shard.
    An exception in the thread is raised by next_step (every rank reads the same shards, so every
    rank stops at the same step; torchrun ends the others when one fails).
    """

    def __init__(self, files: list, slot_tokens: int, d: Dist, prefetch: int = 2):
        self.files, self.slot, self.d = files, slot_tokens + 1, d
        self.queue = queue.Queue(maxsize=prefetch)
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _spans(self):
        need, index = 8 * self.slot, 0
        tokens = read_shard(self.files[0])
        pos = int(np.argmax(tokens == 1))
        while True:
            if pos + need > tokens.size:
                index = (index + 1) % len(self.files)
                tokens, pos = read_shard(self.files[index]), 0
                if tokens.size < need:
                    raise DataError(f"{self.files[index]}: shard smaller than one step "
                                    f"({need} tokens); lower TRAIN_BATCH_TOKENS")
            yield tokens[pos:pos + need]
            pos += need

    def _fill(self):
        first = self.d.rank * self.d.grad_accum
        try:
            for span in self._spans():
                mine = span[first * self.slot:(first + self.d.grad_accum) * self.slot]
                batch = torch.from_numpy(mine.astype(np.int32)).view(self.d.grad_accum, self.slot)
                self.queue.put(batch.pin_memory() if self.d.device.type == "cuda" else batch)
        except BaseException as e:  # handed to the main thread, which would otherwise wait forever
            self.queue.put(e)

    def next_step(self):
        """One (inputs, targets) pair of shape [1, slot_tokens] per micro-step of this rank."""
        while True:
            try:
                batch = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("train loader thread ended without a batch or an error") from None
        if isinstance(batch, BaseException):
            raise RuntimeError(f"train loader thread failed: {type(batch).__name__}: {batch}") from batch
        batch = batch.to(self.d.device, non_blocking=True).long()
        return [(row[None, :-1], row[None, 1:]) for row in batch]


# The score: sums of fp32 token NLLs (nats) and of target bytes, accumulated in float64 and
# all-reduced; BPB = nll / (ln 2 * bytes). Every target of the val stream is scored exactly once
# and the count is checked (the ledger below).


@dataclass
class Score:
    nll: float
    bytes: int
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * max(self.bytes, 1))


def reduce_score(nll: torch.Tensor, nbytes: torch.Tensor, ntok: torch.Tensor) -> Score:
    t = all_reduce(torch.stack([nll.double(), nbytes.double(), ntok.double()]))
    return Score(t[0].item(), int(t[1].item()), int(t[2].item()))


def find_docs(tokens: torch.Tensor, bos_id: int):
    """Target ranges [start, end) of the documents. Doc k = tokens[BOS_k .. BOS_k+1]: its last
    target is the next BOS and the last doc runs to the stream end (a span before the first BOS
    is a doc too), so the documents' targets tile the stream exactly once."""
    n = tokens.numel() - 1
    starts = torch.nonzero(tokens[:n].cpu() == bos_id).flatten().numpy()
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return starts, np.append(starts[1:], n)


# Legality ledger. Conditions of Issue #1017: C1 causal, C2 normalized, C3 score before update,
# C4 each target scored once. C1 and C2 are properties of the code, tested by tools/legality.py;
# C3 and C4 are checked at run time, on every eval, from this ledger.


class ScoreLedger:
    """Every scored target and every optimizer step that consumed val tokens.

    An event is (kind, clock, rows [n, 3] of (doc, start, end)). A "score" row: targets
    [start, end) were scored (doc -1 for sliding windows). An "update" row: the state stepped had
    consumed targets [doc start, end) of that doc (a TTT adapter holds its whole doc prefix).
    Clocks are per rank and aligned (MAX) at every phase pause, so C3 holds across ranks."""

    def __init__(self, num_targets: int, device):
        self.n, self.device, self.clock, self.events = num_targets, device, 0, []

    def record(self, kind: str, rows):
        self.clock += 1
        self.events.append((kind, self.clock, np.asarray(rows, np.int64).reshape(-1, 3)))

    def sync(self):
        t = torch.tensor([self.clock], device=self.device)
        self.clock = int(all_reduce(t, dist.ReduceOp.MAX).item())

    def table(self, kind: str):
        ev = [(c, r) for k, c, r in self.events if k == kind] or [(0, np.zeros((0, 3), np.int64))]
        rows = torch.from_numpy(np.concatenate([r for _, r in ev])).to(self.device)
        clocks = torch.from_numpy(np.repeat([c for c, _ in ev], [len(r) for _, r in ev]))
        return rows, clocks.long().to(self.device)


def expand_rows(rows: torch.Tensor, clocks: torch.Tensor):
    """Target index and clock of every target covered by rows (doc, start, end)."""
    lens = (rows[:, 2] - rows[:, 1]).clamp_min(0)
    offset = torch.repeat_interleave(rows[:, 1] - (lens.cumsum(0) - lens), lens)
    idx = torch.arange(int(lens.sum()), device=rows.device) + offset
    return idx, torch.repeat_interleave(clocks, lens)


NEVER = 2**40  # the clock of a target that was never scored


def score_clocks(led: ScoreLedger):
    """Per target, over all ranks: how often it was scored, and the clock of its first score."""
    idx, clk = expand_rows(*led.table("score"))
    count = all_reduce(torch.bincount(idx, minlength=led.n))
    first = torch.full((led.n,), NEVER, dtype=torch.long, device=led.device)
    first = first.scatter_reduce(0, idx, clk, "amin")
    return count, all_reduce(first, dist.ReduceOp.MIN)


def check_ledger(led: ScoreLedger, starts: np.ndarray) -> dict:
    """C4: every target scored exactly once. C3: every update row's doc prefix [start, end) was
    fully scored at an earlier clock (the latest score in a prefix is a cummax within the doc)."""
    count, first = score_clocks(led)
    doc = torch.zeros(led.n, dtype=torch.long, device=led.device)
    doc[torch.from_numpy(starts).to(led.device)] = 1
    doc = doc.cumsum(0) - 1
    latest = (doc * (NEVER + 1) + first).cummax(0).values - doc * (NEVER + 1)
    rows, clocks = led.table("update")
    late = (latest[rows[:, 2] - 1] >= clocks).sum() if rows.numel() else torch.zeros((), device=led.device)
    late = int(all_reduce(late.reshape(1).long()).item())
    return dict(C3=late == 0, C4=bool((count == 1).all()), scored=int(count.sum()), late_updates=late)


def account(led: ScoreLedger, tbytes, nll, idx, scored, rows) -> torch.Tensor:
    """Record scored targets in the ledger; return their (nll, bytes, count) sums."""
    nll = nll.detach()
    led.record("score", rows)
    m = scored.double()
    return torch.stack([(nll.double() * m).sum(), (tbytes[idx].double() * m).sum(), m.sum()])


# ------------------------------------------------------------------------------------------------
# Model
# 11 blocks x 512, GQA 8/4, partial RoPE, per-head QK gain, XSA, LeakyReLU(0.5)^2 MLP, tied
# embeddings with a softcap, U-Net skips, a 3x loop over layers 3-5, two parallel lanes from layer
# 8, SmearGate and one attention output gate. There is ONE forward: training, every eval and TTT
# call GPT.forward; documents are found from BOS inside it, and TTT adapters are an argument.
# ------------------------------------------------------------------------------------------------

FLEX_BLOCK = 128
# Tile sizes for head dim 64 from bench/flex_tune.py on an H100 with real document masks: 209 ms
# of attention per 786K-token step against 238 ms with torch 2.11's defaults (plain sm80+ configs).
FLEX_OPTIONS = dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_stages=3, fwd_num_warps=4,
                    bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32,
                    bwd_num_stages=3, bwd_num_warps=4)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def segment_ids(idx: torch.Tensor, bos_id: int, max_len: int) -> torch.Tensor:
    """Attention segment of every position: a new one at each BOS, at each row start, and every
    max_len tokens inside a long document. Tokens attend only within their segment (causally)."""
    pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
    bos = idx == bos_id
    doc = bos.long().cumsum(dim=1)  # document number (0 before the first BOS)
    # each document's first position, gathered back (cummax does this too, but its CUDA scan of
    # one 98K-token row took 0.3 ms per micro-step on an H200)
    first = pos.new_zeros(idx.size(0), idx.size(1) + 1).scatter_reduce(1, doc, pos * bos, "amax")
    starts = bos | ((pos - first.gather(1, doc)) % max_len == 0)
    return starts.long().cumsum(dim=1).to(torch.int32)


def flex_doc_mask(seg: torch.Tensor):
    """BlockMask for causal attention inside segments, from per-row segment ids (no sorting).

    Ids never decrease along a row, so the key blocks that query block i can see form one run
    [lo, i]; inside it, the blocks j < i lying wholly in block i's last segment, [flo, i - 1], are
    fully visible, and the rest, [lo, flo) plus the diagonal, need the element mask."""
    B, T = seg.shape
    blocks = seg.view(B, T // FLEX_BLOCK, FLEX_BLOCK).contiguous()
    first, last = blocks[..., 0].contiguous(), blocks[..., -1].contiguous()
    i = torch.arange(first.size(1), device=seg.device).expand_as(first)
    lo = torch.searchsorted(last, first)  # first key block whose last id reaches our first id
    flo = torch.minimum(torch.searchsorted(first, last), i)  # first block inside our last segment
    col = torch.arange(first.size(1), device=seg.device)
    n_part, n_full = flo - lo + 1, i - flo
    part = torch.where(col < (flo - lo)[..., None], lo[..., None] + col, i[..., None])
    full = torch.where(col < n_full[..., None], flo[..., None] + col, torch.zeros_like(part))

    def mask_mod(b, h, q, k):
        return (seg[b, q] == seg[b, k]) & (q >= k)

    as_i32 = lambda t: t.to(torch.int32)[:, None]  # noqa: E731  (add the head dimension)
    return BlockMask.from_kv_blocks(as_i32(n_part), as_i32(part), as_i32(n_full), as_i32(full),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(T, T))


def varlen_cu_seqlens(seg: torch.Tensor, bucket: int = 256):
    """cu_seqlens for FA3 varlen over the flattened rows, padded with the total length to a
    multiple of `bucket` entries so that the compiled graph sees few distinct shapes."""
    flat = (seg + seg.size(1) * torch.arange(seg.size(0), device=seg.device)[:, None]).flatten()
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()
    total = torch.tensor([flat.numel()], device=seg.device)
    n = starts.numel() + 1
    pad = total.expand((n + bucket - 1) // bucket * bucket - n)
    return torch.cat([starts, total, pad]).to(torch.int32)


@torch.compiler.disable
def fa3_attention(q, k, v, cu_seqlens, max_len):
    B, T = q.shape[:2]
    y = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens,
                               cu_seqlens, max_len, max_len, causal=True)
    return (y[0] if isinstance(y, tuple) else y).view(B, T, *q.shape[2:])


def attention(q, k, v, seg, backend: str):
    """Causal attention within segments. q: [B,T,H,hd]; k, v: [B,T,Hkv,hd]. seg: see
    GPT.attention_segments ((cu_seqlens, longest segment) for the varlen kernels)."""
    if backend == "fa3":
        return fa3_attention(q, k, v, *seg)
    if backend == "varlen":
        (seg, max_len), (B, T) = seg, q.shape[:2]
        y = varlen_attn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), seg, seg, max_len, max_len,
                        **VARLEN_KW)
        return y.view(B, T, *q.shape[2:])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "flex":  # seg is the BlockMask, built eagerly (see GPT.attention_segments)
        y = flex_attention_compiled(q, k, v, block_mask=seg, enable_gqa=True, kernel_options=FLEX_OPTIONS)
    else:  # sdpa with an explicit mask: CPU smoke runs and tests
        t = torch.arange(seg.size(1), device=seg.device)
        mask = (seg[:, :, None] == seg[:, None, :]) & (t[:, None] >= t[None, :])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    return y.transpose(1, 2)


def pick_attention_backend(device: torch.device, choice: str = "auto", h=None) -> str:
    """auto: FA3 when importable, else flex on GPU; sdpa (an explicit mask) on CPU. With `h`,
    sdpa on a GPU is refused when its mask would not fit (sdpa_refusal)."""
    if choice == "auto":
        return "sdpa" if device.type != "cuda" else "fa3" if flash_attn_varlen_func else "flex"
    kernel = {"fa3": flash_attn_varlen_func, "varlen": varlen_attn, "flex": flex_attention}
    if kernel.get(choice, True) is None or (choice != "sdpa" and device.type != "cuda"):
        raise RuntimeError(f"ATTN_BACKEND={choice} is not available here (torch {torch.__version__}, "
                           f"{device.type}); use auto")
    why = sdpa_refusal(h) if choice == "sdpa" and device.type == "cuda" and h is not None else None
    if why:
        raise ValueError(why)
    return choice


# sdpa with an explicit mask may run PyTorch's math kernel, which keeps fp32 scores of every head:
# at most this many bytes per layer (the record's training row would need 309 GB, its mask 9.7 GB).
SDPA_MAX_SCORE_BYTES = 2**30


def sdpa_refusal(h) -> str | None:
    """Why ATTN_BACKEND=sdpa cannot run this configuration on a GPU, or None if it can: sdpa builds
    a boolean mask of rows x length x length for each kind of attention call (rows, length)."""
    shapes = {"training rows (TRAIN_BATCH_TOKENS / 8 tokens each)": (1, h.slot_tokens)}
    if h.ttt_enabled:
        shapes["TTT batches (TTT_BATCH_SIZE x TTT_EVAL_SEQ_LEN)"] = (h.ttt_batch_size, h.ttt_eval_seq_len)
        shapes["global TTT micro-batches (GLOBAL_TTT_BATCH_SEQS x TTT_EVAL_SEQ_LEN)"] = (
            h.global_ttt_batch_seqs, h.ttt_eval_seq_len)
    if h.sliding_enabled:
        shapes["sliding windows (VAL_BATCH_TOKENS / 8 / EVAL_SEQ_LEN x EVAL_SEQ_LEN)"] = (
            max(1, h.val_batch_tokens // 8 // h.eval_seq_len), h.eval_seq_len)
    cost = lambda rn: rn[0] * h.num_heads * rn[1] ** 2 * 4  # noqa: E731  (fp32 scores, one layer)
    what, (rows, n) = max(shapes.items(), key=lambda kv: cost(kv[1]))
    if cost((rows, n)) <= SDPA_MAX_SCORE_BYTES:
        return None
    return (f"ATTN_BACKEND=sdpa would build a [{rows}, {n}, {n}] boolean mask ({rows * n * n / 1e9:.1f} GB) "
            f"and up to {cost((rows, n)) / 1e9:.0f} GB of attention scores per layer for the {what}: "
            "use ATTN_BACKEND=auto (FA3 or flex) or varlen on a GPU, or shrink those shapes")


def apply_rope(x, cos, sin, dims: int):
    """Rotate-half RoPE on the first `dims` channels of each head; the rest pass unchanged."""
    x1, x2, rest = x[..., :dims // 2], x[..., dims // 2:dims], x[..., dims:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c, rest), dim=-1)


def lora_delta(x, ab, scale: float):
    """Per-document low-rank update: x [B,T,in], A [B,r,in], B [B,out,r]."""
    a, b = ab
    return (x @ a.transpose(1, 2)) @ b.transpose(1, 2) * scale


class CastedLinear(nn.Linear):
    """fp32 master weight, matmul in the activation dtype. A per-output-channel out_scale is folded
    into the weight: no extra pass over the output, and its gradient is reduced over the small
    [out, in] weight gradient instead of over every token."""

    def __init__(self, d_in: int, d_out: int, zero_init: bool = False):
        super().__init__(d_in, d_out, bias=False)
        nn.init.zeros_(self.weight) if zero_init else nn.init.orthogonal_(self.weight)

    def forward(self, x, out_scale=None):
        w = self.weight if out_scale is None else self.weight * out_scale[:, None]
        return F.linear(x, w.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        d, kv = h.model_dim, h.num_kv_heads * h.head_dim
        self.h, self.heads, self.kv_heads, self.hd = h, h.num_heads, h.num_kv_heads, h.head_dim
        self.c_q, self.c_k, self.c_v = CastedLinear(d, d), CastedLinear(d, kv), CastedLinear(d, kv)
        self.proj = CastedLinear(d, d, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        if h.attn_gate == "dense":  # Qwen-style headwise gate (PR #1736), ~0.5 at init
            self.attn_gate_w = nn.Parameter(torch.randn(h.num_heads, d) * 0.005)
        elif h.attn_gate in ("sparse", "out"):  # sparse PR #1787, out PR #1667; 0.5 or exactly 1 at init
            self.attn_gate_w = nn.Parameter(torch.zeros(h.num_heads, h.gate_window))

    def gate(self, y, n):
        kind, w = self.h.attn_gate, getattr(self, "attn_gate_w", None)
        if kind == "none":
            return y
        if kind == "dense":
            g = torch.sigmoid(n @ w.to(n.dtype).T)
        elif kind == "sparse":
            g = torch.sigmoid(self.h.sparse_attn_gate_scale * (n[..., :w.size(1)] @ w.to(n.dtype).T))
        else:
            g = 2 * torch.sigmoid(n[..., :w.size(1)] @ w.to(n.dtype).T)
        return y * g[..., None]

    def qkv(self, n):
        """q, k and v from ONE matmul over their shared input: n is read once, and backward forms
        dn from one product instead of summing three. The weights stay three parameters (Muon
        orthogonalizes each; GPTQ and the state dict see c_q, c_k, c_v)."""
        mats = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
        return F.linear(n, torch.cat(mats).to(n.dtype)).split([w.size(0) for w in mats], dim=-1)

    def forward(self, n, seg, cos, sin, backend: str, out_scale, lora=None):
        B, T, _ = n.shape
        q, k, v = self.qkv(n)
        if lora is not None:  # only the adapters that exist (TTT_LORA_TARGETS)
            q, k, v = (t + lora_delta(n, lora[name], lora["scale"]) if name in lora else t
                       for t, name in ((q, "q"), (k, "k"), (v, "v")))
        q = rms_norm(q.view(B, T, self.heads, self.hd))
        k = rms_norm(k.view(B, T, self.kv_heads, self.hd))
        v = v.view(B, T, self.kv_heads, self.hd)
        q = apply_rope(q, cos, sin, self.h.rope_dims) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(k, cos, sin, self.h.rope_dims)
        y = attention(q, k, v, seg, backend)
        # XSA (#198 lineage; all layers #478/#1019): drop each head's component along its own value
        yg = y.view(B, T, self.kv_heads, self.heads // self.kv_heads, self.hd)
        vn = F.normalize(v, dim=-1)[:, :, :, None, :]
        y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, self.heads, self.hd)
        out = self.proj(self.gate(y, n).reshape(B, T, -1), out_scale)
        if lora is None or "o" not in lora:
            return out
        return out + out_scale.to(n.dtype) * lora_delta(n, lora["o"], lora["scale"])


MLP_TILE = (128, 256, 64, 8, 3)  # BM, BN, BK, warps, stages of mlp_act_matmul (bench/bench_mlp.py)

if triton is not None:
    @triton.jit
    def mlp_act_matmul(a, b, pre, out, M, N, K, GRAD: tl.constexpr, SLOPE: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr, SMS: tl.constexpr):
        """C = A B^T (A [M, K], B [N, K], row-major) with the MLP activation in the epilogue;
        persistent, so one tile's epilogue overlaps the next tile's loads. Forward (C = x W1^T):
        store pre = C and out = LeakyReLU(pre, SLOPE)^2 from the bf16 pre, as the unfused path
        rounds it. GRAD (C = dout W2): store out = C * act'(pre), act'(u) = 2u (u > 0) or
        2 SLOPE^2 u (the derivative of (SLOPE u)^2).
        (A TMA-descriptor version was no faster, and torch 2.11's compile returned garbage for it.)"""
        n_blocks = N // BN
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * n_blocks, SMS, flatten=True):
            rm = (tile // n_blocks) * BM + tl.arange(0, BM)
            rn = (tile % n_blocks) * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            a_ptr = a + (rm % M)[:, None] * K + rk[None, :]  # wrapped rows: no load masks
            b_ptr = b + rn[:, None] * K + rk[None, :]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for _ in range(0, K, BK):
                acc = tl.dot(tl.load(a_ptr), tl.load(b_ptr).T, acc)
                a_ptr += BK
                b_ptr += BK
            offs, keep = rm[:, None] * N + rn[None, :], (rm < M)[:, None]
            if GRAD:
                p = tl.load(pre + offs, mask=keep).to(tl.float32)
                d = tl.where(p > 0, 2 * p, (2 * SLOPE * SLOPE) * p)
                tl.store(out + offs, (acc * d).to(out.dtype.element_ty), mask=keep)
            else:
                p = acc.to(pre.dtype.element_ty)
                tl.store(pre + offs, p, mask=keep)
                y = p.to(tl.float32)
                y = tl.where(y > 0, y, SLOPE * y)
                tl.store(out + offs, (y * y).to(out.dtype.element_ty), mask=keep)

    def launch_mlp_act(a, b, pre, out, grad: bool, slope: float):
        """a [M, K] and b [N, K] contiguous; pre and out [M, N]."""
        (M, K), N, (BM, BN, BK, warps, stages) = a.shape, b.size(0), MLP_TILE
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        wrap_triton(mlp_act_matmul)[(min(sms, triton.cdiv(M, BM) * (N // BN)),)](
            a, b, pre, out, M, N, K, GRAD=grad, SLOPE=slope, BM=BM, BN=BN, BK=BK, SMS=sms,
            num_warps=warps, num_stages=stages)

    @triton_op("pgolf::mlp_up", mutates_args=())
    def mlp_up(x: torch.Tensor, w1: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x.new_empty(x.size(0), w1.size(0))
        post = torch.empty_like(pre)
        launch_mlp_act(x.contiguous(), w1.contiguous(), pre, post, False, slope)
        return pre, post

    @triton_op("pgolf::mlp_up_grad", mutates_args=())
    def mlp_up_grad(g: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, slope: float) -> torch.Tensor:
        dpre = torch.empty_like(pre)
        launch_mlp_act(g.contiguous(), w2.T.contiguous(), pre, dpre, True, slope)
        return dpre

    @triton.jit
    def softcap_ce_rows(x, tgt, nll, lse, dnll, dx, V, C: tl.constexpr, BV: tl.constexpr, GRAD: tl.constexpr):
        """One row of logits x per program: z = C tanh(x / C) = C (2 s - 1) with s = sigmoid(2x / C).
        Forward: lse = logsumexp(z), nll = lse - z[target]. GRAD: dx = dnll (softmax(z) - onehot)
        * dz/dx, with dz/dx = 1 - tanh^2 = 4 s (1 - s)."""
        row, cols = tl.program_id(0).to(tl.int64), tl.arange(0, BV)
        keep, target = cols < V, tl.load(tgt + row)
        s = tl.sigmoid(2 * tl.load(x + row * V + cols, mask=keep, other=0.0).to(tl.float32) / C)
        z = tl.where(keep, C * (2 * s - 1), -float("inf"))
        if GRAD:
            p = tl.exp(z - tl.load(lse + row))
            dz = (p - (cols == target).to(tl.float32)) * tl.load(dnll + row)
            tl.store(dx + row * V + cols, (dz * 4 * s * (1 - s)).to(dx.dtype.element_ty), mask=keep)
        else:
            m = tl.max(z, 0)
            total = m + tl.log(tl.sum(tl.exp(z - m), 0))
            tl.store(lse + row, total)
            tl.store(nll + row, total - tl.sum(tl.where(cols == target, z, 0.0), 0))

    def launch_softcap_ce(x, tgt, nll, lse, dnll, dx, softcap: float, grad: bool):
        wrap_triton(softcap_ce_rows)[(x.size(0),)](x, tgt, nll, lse, dnll, dx, x.size(1), C=softcap,
                                                  BV=triton.next_power_of_2(x.size(1)), GRAD=grad, num_warps=8)

    @triton_op("pgolf::softcap_ce", mutates_args=())
    def softcap_ce(x: torch.Tensor, tgt: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        nll = x.new_empty(x.size(0), dtype=torch.float32)
        lse = torch.empty_like(nll)
        x, tgt = x.contiguous(), tgt.contiguous()
        launch_softcap_ce(x, tgt, nll, lse, lse, nll, softcap, False)  # dnll, dx unused
        return nll, lse

    @triton_op("pgolf::softcap_ce_grad", mutates_args=())
    def softcap_ce_grad(dnll: torch.Tensor, x: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor,
                        softcap: float) -> torch.Tensor:
        x, tgt, dnll = x.contiguous(), tgt.contiguous(), dnll.contiguous()
        dx = torch.empty_like(x)
        launch_softcap_ce(x, tgt, dx, lse, dnll, dx, softcap, True)  # nll unused
        return dx


class FusedMLP(torch.autograd.Function):
    """act(x W1^T) W2^T with the activation and its derivative fused into Triton matmul epilogues;
    pre and post activations are saved instead of recomputed (the fused MLP of PR #1530)."""

    @staticmethod
    def forward(ctx, x, w1, w2, slope: float):
        pre, post = torch.ops.pgolf.mlp_up(x, w1, slope)
        ctx.save_for_backward(x, w1, w2, pre, post)
        ctx.slope = slope
        return post @ w2.T

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, pre, post = ctx.saved_tensors
        dpre = torch.ops.pgolf.mlp_up_grad(g, w2, pre, ctx.slope)
        need = ctx.needs_input_grad  # TTT freezes the weights: skip their two matmuls
        return dpre @ w1, dpre.T @ x if need[1] else None, g.T @ post if need[2] else None, None


def use_fused_kernels(x: torch.Tensor) -> bool:
    """Triton kernels (MLP, CE) for gradient-taking bf16 calls on the GPU (training, TTT); plain ops
    elsewhere (same math), so GPTQ's input hooks on fc/proj see every no-grad calibration call."""
    return triton is not None and x.is_cuda and x.dtype == torch.bfloat16 and torch.is_grad_enabled()


def use_fused_mlp(n: torch.Tensor, hidden: int) -> bool:
    return use_fused_kernels(n) and hidden % MLP_TILE[1] == 0 and n.size(-1) % MLP_TILE[2] == 0


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.fc = CastedLinear(h.model_dim, h.mlp_mult * h.model_dim)
        self.proj = CastedLinear(h.mlp_mult * h.model_dim, h.model_dim, zero_init=True)
        self.slope = h.mlp_leaky_slope

    def forward(self, n, out_scale, lora=None):
        if use_fused_mlp(n, self.fc.weight.size(0)):
            w1, w2 = self.fc.weight.to(n.dtype), (self.proj.weight * out_scale[:, None]).to(n.dtype)
            out = FusedMLP.apply(n.reshape(-1, n.size(-1)), w1, w2, self.slope).view_as(n)
        else:
            out = self.proj(F.leaky_relu(self.fc(n), self.slope).square(), out_scale)
        if lora is None or "mlp" not in lora:
            return out
        return out + out_scale.to(n.dtype) * lora_delta(n, lora["mlp"], lora["scale"])


class Block(nn.Module):
    """A sequential block, or (physical layer >= parallel_start_layer) a two-lane parallel block
    (PR #1529): attention reads lane 0 (mixed with x0), the MLP reads lane 1, both lanes get both."""

    def __init__(self, h: Hyperparameters, layer: int):
        super().__init__()
        d = h.model_dim
        self.attn, self.mlp, self.parallel = Attention(h), MLP(h), layer >= h.parallel_start_layer
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.register_buffer("ln_scale", torch.tensor(1 / math.sqrt(layer + 1)), persistent=False)  # PR #315
        if self.parallel:
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def forward(self, x, lane1, x0, seg, cos, sin, backend: str, lora=None):
        mix, s = self.resid_mix.to(x.dtype), self.ln_scale.to(x.dtype)
        xin = mix[0] * x + mix[1] * x0
        a = self.attn(rms_norm(xin) * s, seg, cos, sin, backend, self.attn_scale, lora)
        if not self.parallel:
            x1 = xin + a
            return x1 + self.mlp(rms_norm(x1) * s, self.mlp_scale, lora), None
        m = self.mlp(rms_norm(lane1) * s, self.mlp_scale, lora)
        r, p = self.lane_resid.to(x.dtype), self.lane_post.to(x.dtype)
        return r[0] * x + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m


def skip_merge(x, skip, gate, weight):
    """U-Net skip as a sigmoid-gated lerp: x <- g x + (1 - g) w skip (g = 0.5 at init)."""
    g = torch.sigmoid(gate).to(x.dtype)
    return g * x + (1 - g) * weight.to(x.dtype) * skip


def final_norm(lane0, lane1):
    return rms_norm(0.5 * (lane0 + lane1))


class SoftcapCE(torch.autograd.Function):
    """Per-row NLL of softcapped logits in one Triton pass over the bf16 logits, forward and
    backward (the fused CE of PR #1787): no fp32 copy of the [rows, vocab] logits is stored."""

    @staticmethod
    def forward(ctx, logits, targets, softcap: float):
        nll, lse = torch.ops.pgolf.softcap_ce(logits, targets, softcap)
        ctx.save_for_backward(logits, targets, lse)
        ctx.softcap = softcap
        return nll

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        return torch.ops.pgolf.softcap_ce_grad(g, logits, targets, lse, ctx.softcap), None, None


def softcap_nll(hidden, weight, targets, softcap: float, head_delta=None, hint=None, boost: float = 0.0):
    """Per-token NLL (fp32) of the full softmax over softcapped tied-embedding logits. Where
    hint >= 0 the distribution is tilted toward the hinted token (ngram_tilt; scoring only)."""
    logits = F.linear(hidden, weight.to(hidden.dtype))
    if head_delta is not None:
        logits = logits + head_delta
    if use_fused_kernels(logits):
        nll = SoftcapCE.apply(logits.flatten(0, 1), targets.flatten(), float(softcap)).view_as(targets)
    else:
        z = softcap * torch.tanh(logits.float() / softcap)
        nll = F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return nll if hint is None else ngram_tilt(nll, logits, targets, hint, softcap, boost)


def ngram_tilt(nll, logits, targets, hint, softcap: float, boost: float):
    """Token n-gram tilt (PR #2140/#2135): the hinted token's logit + boost, then the full softmax
    renormalizes: p'(a) = p(a) e^(boost [a = hint]) / (1 + p(hint) (e^boost - 1)), so -log p'(y) =
    nll - boost [y = hint] + log1p(p(hint) (e^boost - 1)), from two gathered logits (log p(hint)
    = z_hint - lse, lse = nll + z_y). The tilt term is detached: TTT steps train on the model's NLL."""
    ids = torch.stack([targets, hint.clamp_min(0)], -1)
    z = softcap * torch.tanh(logits.gather(-1, ids).float() / softcap)
    log_p_hint = z[..., 1] - z[..., 0] - nll.detach()
    tilt = torch.log1p(math.expm1(boost) * log_p_hint.exp()) - boost * (targets == hint)
    return nll + torch.where(hint >= 0, tilt, 0.0).detach()


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters, bos_id: int, backend: str):
        super().__init__()
        self.h, self.bos_id, self.backend, self.looping = h, bos_id, backend, False
        self.seq_len = h.train_seq_len  # attention span: longer documents are cut into segments of this
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=TIED_EMBED_INIT_STD)
        self.blocks = nn.ModuleList(Block(h, i) for i in range(h.num_layers))
        n_skip = len(self.layer_order(True)) // 2
        self.skip_weights = nn.Parameter(torch.ones(n_skip, h.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, h.model_dim))
        if h.smear_gate_enabled:
            self.smear_w = nn.Parameter(torch.zeros(1, h.gate_window))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.compute_dtype = torch.bfloat16 if backend != "sdpa" else torch.float32
        self.trained_on_val = False  # set by prequant_ttt (ILLEGAL), kept by the artifact (load_artifact)
        # module functions held as attributes only so that compile_model can swap in compiled
        # versions (and tools/legality.py can wrap nll)
        self.nll, self.skip_merge, self.final_norm = softcap_nll, skip_merge, final_norm

    def layer_order(self, looping: bool) -> list:
        """Physical layer of every virtual position: 0..10, or with the loop 0,1,2,(3,4,5)x3,6..10."""
        h, layers = self.h, list(range(self.h.num_layers))
        if not looping:
            return layers
        loop = layers[h.loop_start:h.loop_end + 1]
        return layers[:h.loop_start] + loop * (h.num_loops + 1) + layers[h.loop_end + 1:]

    def embed(self, idx):
        """Token embedding, SmearGate (PR #1667; never across a BOS: the fix of PR #1851), RMSNorm."""
        e = self.tok_emb(idx).to(self.compute_dtype)
        if self.h.smear_gate_enabled:
            w = self.smear_w.to(e.dtype)
            gate = self.smear_lambda.to(e.dtype) * torch.sigmoid(e[..., :w.size(1)] @ w.T)
            prev = F.pad(e[:, :-1], (0, 0, 1, 0)) * (idx != self.bos_id)[..., None]
            e = e + gate * prev
        return rms_norm(e)

    def rope(self, T: int, device):
        d = self.h.rope_dims
        inv = ROPE_BASE ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        f = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
        return f.cos().to(self.compute_dtype), f.sin().to(self.compute_dtype)

    def attention_segments(self, idx):
        """What the attention backend needs to keep documents apart. Built outside the compiled
        blocks: a flex BlockMask built inside a compiled region came out wrong on CUDA
        (torch 2.11), and eager masks are reused by the compiled graph without recompiling."""
        seg = segment_ids(idx, self.bos_id, self.seq_len)
        if self.backend in ("fa3", "varlen"):
            return varlen_cu_seqlens(seg), self.seq_len
        return flex_doc_mask(seg) if self.backend == "flex" else seg

    def hidden(self, idx, lora=None):
        x0 = self.embed(idx)
        seg, (cos, sin) = self.attention_segments(idx), self.rope(idx.size(1), idx.device)
        order = self.layer_order(self.looping)
        n_enc, skips, x, lane1 = len(order) // 2, [], x0, None
        for i, layer in enumerate(order):
            block = self.blocks[layer]
            if block.parallel and lane1 is None:
                lane1 = x  # both lanes start from x; the skip below goes to lane 0 only (PR #1529)
            if n_enc <= i < 2 * n_enc:  # U-Net: decoder position j merges encoder output -j-1
                j = i - n_enc
                x = self.skip_merge(x, skips.pop(), self.skip_gates[j], self.skip_weights[j])
            x, lane1 = block(x, lane1, x0, seg, cos, sin, self.backend,
                             None if lora is None else lora["layers"][i])
            if i < n_enc:
                skips.append(x)
        return self.final_norm(x, x if lane1 is None else lane1)

    def forward(self, idx, targets, lora=None, tilt=None):
        """Per-token NLL [B, T] in nats; callers reduce (mean for training, sums for BPB). `tilt`
        (hint [B, T] with -1 = none, boost): the n-gram tilt of scoring calls (ngram_tilt)."""
        x = self.hidden(idx, lora)
        delta = None if lora is None or "head" not in lora else lora_delta(x, lora["head"], lora["scale"])
        return self.nll(x, self.tok_emb.weight, targets, LOGIT_SOFTCAP, delta, *(tilt or (None, 0.0)))


def compile_model(model: GPT) -> None:
    """Regional compilation: every block shares one compiled graph per variant (sequential or
    parallel, train or eval), so the loop on/off switch costs no recompile."""
    torch._dynamo.config.cache_size_limit = 64
    full = model.backend != "fa3"  # FA3 runs outside the graph (a graph break by design)
    for block in model.blocks:
        block.compile(fullgraph=full, dynamic=False)
    model.embed = torch.compile(model.embed, fullgraph=True, dynamic=False)
    for name in ("nll", "skip_merge", "final_norm"):  # small graphs that fuse the glue between blocks
        setattr(model, name, torch.compile(getattr(model, name), fullgraph=True, dynamic=False))


@contextmanager
def weights_restored(model: nn.Module):
    """Compile warmups take real steps on synthetic tokens; the weights go back afterwards."""
    initial = copy.deepcopy(model.state_dict())
    yield
    model.load_state_dict(initial)


# ------------------------------------------------------------------------------------------------
# Optimizer
# Muon for the block matrices: Nesterov momentum, row normalization (MuonEq-R), 5 Polar Express
# Newton-Schulz steps, decoupled weight decay, scale sqrt(max(1, rows/cols)). Matrices of one shape
# form a stack; each rank reduce-scatters the stack's gradient, orthogonalizes its shard and
# all-gathers the updates. AdamW handles the tied embedding and the small control tensors.
# ------------------------------------------------------------------------------------------------

POLAR_EXPRESS = (  # per-iteration (a, b, c), from the Polar Express paper via PR #1344/#1787
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate U V^T of each matrix in the stack g [n, rows, cols] (bf16 iterations)."""
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps]:
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).float()


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight")


class Muon:
    def __init__(self, named_params: list, d: Dist, h: Hyperparameters):
        self.d, self.h, self.stacks = d, h, {}
        for _, p in named_params:
            self.stacks.setdefault(tuple(p.shape), []).append(p)
        self.state = {}
        for shape, ps in self.stacks.items():
            shard = -(-len(ps) // d.world_size)  # ceil: stacks are padded to a multiple of world
            self.state[shape] = dict(buf=torch.zeros(shard, *shape, device=d.device), grad=None)

    def reduce_grads(self) -> list:
        """Start the reduce-scatter of every stack; returns the handles to wait on."""
        handles, W = [], self.d.world_size
        for shape, ps in self.stacks.items():
            st = self.state[shape]
            full = torch.zeros(st["buf"].size(0) * W, *shape, device=self.d.device)
            torch.stack([p.grad for p in ps], out=full[:len(ps)])
            if W == 1:
                st["grad"] = full
                continue
            st["grad"] = torch.empty_like(st["buf"])
            handles.append(reduce_scatter_avg(st["grad"], full))
        return [hd for hd in handles if hd is not None]

    def sq_norm(self) -> torch.Tensor:
        return sum(st["grad"].square().sum() for st in self.state.values())

    @torch.no_grad()
    def step(self, lr: float, momentum: float, clip: torch.Tensor):
        for shape, ps in self.stacks.items():
            st = self.state[shape]
            g = st["grad"] * clip
            st["buf"].mul_(momentum).add_(g)
            u = g + momentum * st["buf"]  # Nesterov
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)  # MuonEq-R rows (PR #1217)
            update = orthogonalize(u, MUON_BACKEND_STEPS) * math.sqrt(max(1, shape[0] / shape[1]))
            full = all_gather_cat(update, self.d)[:len(ps)]  # drop the padding of the stack
            torch._foreach_mul_(ps, 1 - lr * self.h.muon_wd)
            torch._foreach_add_(ps, list(full.unbind(0)), alpha=-lr)


def reduce_scatter_avg(out: torch.Tensor, full: torch.Tensor):
    if dist.get_backend() == "nccl":
        return dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True)
    dist.all_reduce(full)  # gloo (CPU tests) has no reduce-scatter
    out.copy_(full.chunk(dist.get_world_size())[dist.get_rank()] / dist.get_world_size())
    return None


def all_gather_cat(shard: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size == 1:
        return shard
    full = torch.empty(d.world_size * shard.size(0), *shard.shape[1:], device=shard.device)
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(full, shard)
    else:
        dist.all_gather(list(full.chunk(d.world_size)), shard)
    return full


class Optimizers:
    """Muon + AdamW with one global-norm clip, identical on every rank and every world size."""

    def __init__(self, model: GPT, d: Dist, h: Hyperparameters):
        named = list(model.named_parameters())
        self.muon = Muon([(n, p) for n, p in named if is_muon_param(n, p)], d, h)
        emb = [model.tok_emb.weight]
        small = [p for n, p in named if not is_muon_param(n, p) and p is not model.tok_emb.weight]
        self.replicated = emb + small
        self.adam = torch.optim.AdamW(
            [dict(params=emb, lr=h.tied_embed_lr, weight_decay=h.embed_wd),
             dict(params=small, lr=h.scalar_lr, weight_decay=h.adam_wd)],
            betas=(ADAM_BETA1, h.beta2), eps=ADAM_EPS, fused=d.device.type == "cuda")
        self.base_lrs = [g["lr"] for g in self.adam.param_groups]
        self.d, self.h = d, h

    def step(self, lr_mult: float, momentum: float) -> float:
        handles = self.muon.reduce_grads()  # async reduce-scatter of the matrix stacks
        grads = [p.grad for p in self.replicated]
        if self.d.world_size > 1:
            torch._foreach_copy_(grads, torch._foreach_div(all_reduce_flat(grads), self.d.world_size))
        for hd in handles:
            hd.wait()
        # Global norm: the Muon shards are disjoint across ranks, the replicated grads identical.
        sq = all_reduce(self.muon.sq_norm().reshape(1)) + torch.stack(torch._foreach_norm(grads)).square().sum()
        norm = sq.sqrt().squeeze()
        clip = (self.h.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0) if self.h.grad_clip_norm else \
            torch.ones_like(norm)
        torch._foreach_mul_(grads, clip)
        for g, base in zip(self.adam.param_groups, self.base_lrs):
            g["lr"] = base * lr_mult
        self.adam.step()
        self.muon.step(self.h.matrix_lr * lr_mult, momentum, clip)  # Muon applies clip to its shard
        return norm

    def zero_grad(self):
        for ps in self.muon.stacks.values():
            for p in ps:
                p.grad = None
        self.adam.zero_grad(set_to_none=True)


def lr_multiplier(frac: float, h: Hyperparameters) -> float:
    """1 until the warmdown, then linear to MIN_LR at the end of training (no LR warmup)."""
    if frac < 1 - h.warmdown_frac:
        return 1.0
    return max((1 - frac) / h.warmdown_frac, h.min_lr)


def muon_momentum(step: int, frac: float, h: Hyperparameters) -> float:
    """Linear warm-up over MUON_MOMENTUM_WARMUP_STEPS steps, or over the first
    MUON_MOMENTUM_WARMUP_FRAC of training (a short run never reaches step 1500)."""
    if h.muon_momentum_warmup_frac:
        t = min(frac / h.muon_momentum_warmup_frac, 1.0)
    else:
        t = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps else 1.0
    return h.muon_momentum_warmup_start + t * (h.muon_momentum - h.muon_momentum_warmup_start)


class EMA:
    """fp32 shadow of every parameter, e <- d_t * e + (1 - d_t) * p after update t (0, 1, ...).
    With `warmup`, d_t = min(decay, (1+t)/(10+t)) (the ramp of TF's ExponentialMovingAverage):
    a constant 0.9965 keeps 0.9965^330 = 31 % of its weight on the random init after 330 steps."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self):
        w = 1 - self.decay_at(self.updates)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], w)
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


# ------------------------------------------------------------------------------------------------
# Quantization and packing
# After training: Hessians from training data, GPTQ with per-row std clipping (int6 matrices, int7
# embedding; PR #1394), LQER low-rank fixes on the worst tensors (PR #1797), int8 gate rows, fp16
# control tensors, then a deterministic container compressed with brotli. The score is taken on the
# model read back from it.
# ------------------------------------------------------------------------------------------------

ARTIFACT_CAP = 16_000_000  # code + compressed model bytes (decimal), the challenge's cap
QUANT_MAGIC, QUANT_VERSION = b"PGQZ", 3  # 2: payload in parallel slices; 3: + configuration block
BROTLI = 0  # the container's compressor byte (1 was lzma, retired)
FP16_TINY = 2.0**-24  # smallest positive fp16; the spec's 1e-10 floor would round to 0 in fp16
GPTQ_SUFFIXES = {  # weight name suffix -> tensor class (bits and clip sigma come from the class)
    "attn.c_q.weight": "attn", "attn.c_k.weight": "attn", "attn.c_v.weight": "attn",
    "attn.proj.weight": "attn", "mlp.fc.weight": "mlp", "mlp.proj.weight": "mlp",
}
MATRIX_CLASSES = ("embed", "attn", "mlp")  # the GPTQ'd (and LQER-eligible) classes
PASSTHROUGH_MAX_NUMEL = 65536  # float tensors up to this size are kept as fp16
GPTQ_DAMP_TRIES = 4  # damping GPTQ_DAMP * 10**k, k < 4, before falling back to rounding


def clip_range(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def fp16_scale(s: torch.Tensor) -> torch.Tensor:
    return s.float().clamp_min(FP16_TINY).to(torch.float16)


def sdclip_scale(W: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """Per-row scale k*std(row)/R in fp16: the clip edge sits at +-k row standard deviations."""
    if W.ndim != 2 or W.shape[1] < 2:
        raise ValueError(f"SDClip needs rows of 2+ values, got shape {tuple(W.shape)}")
    return fp16_scale(clip_sigmas * W.float().std(dim=1) / clip_range(bits))


def quantize_groups(x: torch.Tensor, group: int, lo: int, hi: int, denom: float):
    """Symmetric absmax quantization of consecutive groups of `group` elements of flattened x.
    Returns int8 q (shape of x) and one fp16 scale per group, s = max|group|/denom."""
    g = x.float().reshape(-1, group)
    s = fp16_scale(g.abs().amax(dim=1) / denom)
    q = torch.clamp(torch.round(g / s.float()[:, None]), lo, hi)
    return q.to(torch.int8).reshape(x.shape), s


def dequantize_groups(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_groups; also per-row dequant (one group per row)."""
    g = q.reshape(s.numel(), -1).float() * s.float()[:, None]
    return g.reshape(q.shape)


def rtn_quantize(W: torch.Tensor, bits: int, clip_sigmas: float):
    """Round to nearest with the SDClip scale: the baseline, and the fallback without a Hessian."""
    s = sdclip_scale(W, bits, clip_sigmas)
    R = clip_range(bits)
    q = torch.clamp(torch.round(W.float() / s.float()[:, None]), -R, R)
    return q.to(torch.int8), s


def gptq_inverse_factor(H: torch.Tensor, damp: float):
    """Damped, act-ordered Hessian -> (upper Cholesky factor of its inverse, column order, dead).
    Float64 because the inverse of a 2048-wide Hessian loses too much in float32."""
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs that never fire: any weight there is free, set it to 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # act-order
    H = H[perm][:, perm]
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True).float(), perm, dead


def gptq_columns(Wt: torch.Tensor, U: torch.Tensor, S: torch.Tensor, R: list, block: int):
    """The GPTQ sweep on the transposed, permuted weight Wt (cols x rows), updated in place, with
    column j's per-row scales S[j] and clip range R[j]. Each column is rounded, and its error,
    divided by U[j, j], is pushed onto the later columns of the block at once and onto the rest
    of the matrix at the block's end (one matmul)."""
    Q = torch.empty_like(Wt)
    for i1 in range(0, Wt.shape[0], block):
        i2 = min(i1 + block, Wt.shape[0])
        Ub, err = U[i1:i2, i1:i2], torch.empty_like(Wt[i1:i2])
        for j in range(i2 - i1):
            w, s, r = Wt[i1 + j], S[i1 + j], R[i1 + j]
            q = torch.clamp(torch.round(w / s), -r, r, out=Q[i1 + j])
            torch.div(w - q * s, Ub[j, j], out=err[j])
            Wt[i1 + j + 1 : i2].addr_(Ub[j, j + 1 :], err[j], alpha=-1.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1.0)
    return Q


def gptq_quantize(W, H, bits, clip_sigmas, block_size=128, damp=0.01, keep=None):
    """GPTQ with the SDClip per-row scale (spec 5.3). W (rows x cols), H (cols x cols) = E[X^T X].
    Returns int8 q of W's shape and the fp16 per-row scale; W ~ q * s[:, None]. Columns of the
    bool mask `keep` (AWQ-lite) are solved at int8 with the scale sdclip_scale(W, 8, k) instead,
    so the error of every other column is compensated for their finer rounding."""
    s = sdclip_scale(W, bits, clip_sigmas)  # from the original W, as in the reference
    U, perm, dead = gptq_inverse_factor(H.to(W.device), damp)
    Wt = W.float().masked_fill(dead, 0.0)[:, perm].T.contiguous()
    S, R = s.float().expand(W.shape[1], -1), [clip_range(bits)] * W.shape[1]
    if keep is not None:
        kp = keep.to(W.device)[perm]
        S = torch.where(kp[:, None], sdclip_scale(W, 8, clip_sigmas).float(), S)
        R = torch.where(kp.cpu(), clip_range(8), clip_range(bits)).tolist()
    Q = gptq_columns(Wt, U, S, R, block_size)
    q = torch.empty_like(W, dtype=torch.int8)
    q[:, perm] = Q.T.to(torch.int8)
    return q, s


def lqer_factors(E: torch.Tensor, rank: int, group: int) -> dict:
    """Rank-r SVD of the quantization error E ~ A @ B, packed small and asymmetric (spec 5.4):
    A int2 in [-2, 1] with one scale max|A|/1.5, B int4 in [-8, 7] with one scale max|g|/7.5 per
    `group` elements. (The spec's symmetric fallback for a B that does not split into groups is
    gone: every B here is rank x a multiple of MODEL_DIM, checked in Hyperparameters.)"""
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    r = min(rank, S.numel())
    A, B = U[:, :r] * S[:r], Vh[:r]
    if B.numel() % group:
        raise ValueError(f"LQER factor B of {tuple(B.shape)} does not split into LQER_ASYM_GROUP={group} "
                         "groups: pick a group that divides LQER_RANK x the matrix width")
    qa, sa = quantize_groups(A, A.numel(), -2, 1, 1.5)
    qb, sb = quantize_groups(B, group, -8, 7, 7.5)
    return {"lqer_qa": qa.cpu(), "lqer_sa": sa.cpu(), "lqer_qb": qb.cpu(), "lqer_sb": sb.cpu()}


def lqer_reconstruct(f: dict) -> torch.Tensor:
    """A @ B from packed factors; the group sizes follow from the number of scales."""
    A = dequantize_groups(f["lqer_qa"], f["lqer_sa"])
    return A @ dequantize_groups(f["lqer_qb"], f["lqer_sb"])


def tensor_class(name: str, t: torch.Tensor) -> str:
    """embed | attn | mlp -> GPTQ; gate -> int8 rows; fp16 -> passthrough; raw -> as is.
    Named block matrices are GPTQ'd at any size (so small smoke models exercise GPTQ); at record
    size they are all above PASSTHROUGH_MAX_NUMEL anyway, as the spec's size rule has it."""
    if not t.is_floating_point():
        return "raw"
    if name == "tok_emb.weight":
        return "embed"
    for suffix, cls in GPTQ_SUFFIXES.items():
        if name.endswith(suffix) and t.ndim == 2:
            return cls
    if name.endswith("attn_gate_w") and t.ndim == 2 and 32 <= t.numel() <= 8192:
        return "gate"
    if t.numel() <= PASSTHROUGH_MAX_NUMEL:
        return "fp16"
    raise ValueError(f"{name}: no quantization rule for a {tuple(t.shape)} tensor of {t.numel()} values "
                     f"(GPTQ covers tok_emb and the GPTQ_SUFFIXES block matrices)")


def class_bits_sigma(cls: str, h) -> tuple:
    return {
        "embed": (h.embed_bits, h.embed_clip_sigmas), "attn": (h.matrix_bits, h.attn_clip_sigmas),
        "mlp": (h.matrix_bits, h.mlp_clip_sigmas),
    }[cls]


def gptq_damped(W: torch.Tensor, H: torch.Tensor, bits: int, sigma: float, keep=None) -> tuple:
    """GPTQ, retried with 10x the damping while the Cholesky fails: Hessians accumulated in
    fp32 from heavy-tailed activations can be slightly indefinite (seen on an mlp.proj Hessian).
    Returns ((q, s), damp), or (None, None) when the Hessian is unusable."""
    if not bool(torch.isfinite(H).all()):
        return None, None
    for k in range(GPTQ_DAMP_TRIES):
        damp = GPTQ_DAMP * 10**k
        try:
            return gptq_quantize(W, H, bits, sigma, GPTQ_BLOCK_SIZE, damp, keep), damp
        except torch.linalg.LinAlgError:
            continue
    return None, None


def quantize_matrix(W: torch.Tensor, H, cls: str, h, awq=()) -> tuple:
    """GPTQ one matrix on its Hessian's device; round to nearest when there is no usable Hessian.
    AWQ-lite groups (first columns `awq`) are stored in q as int8 codes with their own per-row
    fp16 scale awq_s: the same clip edge k * std(row), a step of 127 instead of 2^(bits-1) - 1."""
    bits, sigma = class_bits_sigma(cls, h)
    Wd = W if H is None else W.to(H.device)
    keep = awq_mask(W.shape[1], awq, h.awq_lite_group_size) if awq else None
    qs, damp = (None, None) if H is None else gptq_damped(Wd, H, bits, sigma, keep)
    if qs is None:
        q, s = rtn_quantize(W, bits, sigma)
        label = f"rtn (int{bits}, {'no hessian' if H is None else 'hessian unusable'})"
    else:
        q, s = qs
        label = f"gptq (int{bits}" + (f", damp {damp:g})" if damp != GPTQ_DAMP else ")")
    e = {"kind": "rows", "bits": bits, "q": q.cpu(), "s": s.cpu()}
    if qs is not None and awq:
        e.update(awq_cols=list(awq), awq_group=h.awq_lite_group_size,
                 awq_s=sdclip_scale(Wd, 8, sigma).cpu())
        label += "+awq_int8"
    return e, label


def awq_mask(cols: int, starts, group: int) -> torch.Tensor:
    keep = torch.zeros(cols, dtype=torch.bool)
    for a in starts:
        keep[a:a + group] = True
    return keep


def awq_groups(sd: dict, hessians: dict, h) -> dict:
    """AWQ-lite (PR #1908): the AWQ_LITE_GROUPS column groups of highest saliency over all GPTQ'd
    matrices below int8 (one ranking across tensors, as #1908's AWQ_LITE_GROUP_TOP_K). A column's
    saliency is its input RMS per call, sqrt(diag H / passes), times its mean |W| (as #1908); a
    group's is the sum over its AWQ_LITE_GROUP_SIZE columns. Returns {name: [first columns]}."""
    g, cands = h.awq_lite_group_size, []
    for name, t in sd.items():
        cls, H = tensor_class(name, t), hessians.get(name)
        if cls not in MATRIX_CLASSES or H is None or class_bits_sigma(cls, h)[0] >= 8:
            continue
        # calibration runs the loop (collect_hessians): a looped layer's H sums every pass
        passes = h.num_loops + 1 if h.num_loops > 0 and h.loop_start <= layer_index(name) <= h.loop_end else 1
        rms = (H.diagonal().float() / passes).clamp_min(0).sqrt().cpu()
        sal = rms * t.detach().float().abs().mean(0).cpu()
        sums = sal[: sal.numel() // g * g].view(-1, g).sum(1).tolist()
        cands += [(-v, name, i * g) for i, v in enumerate(sums)]
    picked = {}
    for _, name, start in sorted(cands)[: h.awq_lite_groups]:
        picked.setdefault(name, []).append(start)
    return picked


def quantize_tensor(name: str, t: torch.Tensor, hessians: dict, h, awq=()) -> tuple:
    cls = tensor_class(name, t)
    t = t.detach()
    if cls == "gate":  # tiny, and the gate's sign pattern matters: plain int8 rows
        q, s = quantize_groups(t, t.shape[1], -127, 127, 127.0)
        return {"kind": "rows", "bits": 8, "q": q.cpu(), "s": s.cpu()}, "int8 rows (gate)"
    if cls == "fp16":
        return {"kind": "fp16", "t": t.to(torch.float16).cpu()}, "passthrough (fp16)"
    if cls == "raw":
        return {"kind": "raw", "t": t.cpu().clone()}, f"raw ({str(t.dtype).removeprefix('torch.')})"
    return quantize_matrix(t, hessians.get(name), cls, h, awq)


def dequantize_entry(e: dict) -> torch.Tensor:
    if e["kind"] == "fp16":
        return e["t"].float()
    if e["kind"] == "raw":
        return e["t"].clone()
    w = dequantize_groups(e["q"], e["s"])
    if "awq_s" in e:  # AWQ-lite columns: int8 codes with their own per-row scale
        keep = awq_mask(w.shape[1], e["awq_cols"], e["awq_group"])
        w[:, keep] = e["q"][:, keep].float() * e["awq_s"].float()[:, None]
    return w + lqer_reconstruct(e) if "lqer_qa" in e else w


def dequantize_state_dict(qstate: dict) -> dict:
    """Float state dict (fp32; non-float tensors unchanged) in the original key order."""
    return {name: dequantize_entry(e) for name, e in qstate.items()}


def apply_lqer(sd: dict, qstate: dict, h) -> list:
    """Add LQER factors to the LQER_TOP_K GPTQ'd matrices of largest ||W - W_hat||_F^2 (taken on
    the CPU, where dequantized weights live); returns their names."""
    errs = {n: (t.detach().cpu().float() - dequantize_entry(qstate[n])).pow(2).sum().item()
            for n, t in sd.items() if tensor_class(n, t) in MATRIX_CLASSES}
    top = sorted(errs, key=lambda n: (-errs[n], n))[: h.lqer_top_k]
    for n in top:
        W = sd[n].detach().float()
        E = W - dequantize_entry(qstate[n]).to(W.device)
        qstate[n].update(lqer_factors(E, h.lqer_rank, h.lqer_asym_group))
    return top


def quantize_state_dict(sd: dict, hessians: dict, h, log=print) -> dict:
    """Quantize a float state dict (spec 5.3-5.4) into the qstate: each name maps to an entry
    {kind, [bits], tensors...} that serialize() writes and dequantize_state_dict() reads. Logs
    one line per treatment with the names it got."""
    qstate, labels = {}, {}
    awq = awq_groups(sd, hessians, h) if h.awq_lite_groups else {}
    for name, t in sd.items():
        qstate[name], labels[name] = quantize_tensor(name, t, hessians, h, awq.get(name, ()))
    for n in apply_lqer(sd, qstate, h) if h.lqer_enabled else []:
        labels[n] += "+lqer_asym"
    cats = {}
    for name, label in labels.items():
        cats.setdefault(label, []).append(name)
    for label in sorted(cats):
        log(f"{label}: {', '.join(cats[label])}")
    return qstate


# Container: MAGIC, version byte, compressor byte, 8 bytes of sha256(payload), then the compressed
# payload = uint32 index length | JSON index | raw little-endian tensor bytes.
# The index holds each entry's small fields (in state-dict order) and the stored tensors in
# payload order. Payload order groups tensors by field and then by weight type across layers
# (all c_q codes, then all c_k codes, ...), so each brotli block sees one distribution.
# Measured on an 11 x 512, V 8192 model trained 170 s on an H100 (brotli blob 15.77 MB), against
# a row-major, state-dict-order layout: column-major codes -331 KB (mlp.proj -255 KB, tok_emb
# -71 KB, the rest within 4 KB), grouping by type -7 KB, fp16 byte planes -3 KB. lzma -9 was 7%
# larger than brotli -11. Not used: the records' greedy L1 row reorder (at most -11 KB net, on
# tok_emb only) and a stride-2 shuffle of the whole blob (+0.2% on a smaller model).


def weight_type(name: str) -> str:  # "blocks.3.mlp.fc.weight" -> "blocks.mlp.fc.weight"
    return ".".join(p for p in name.split(".") if not p.isdigit())


def layer_index(name: str) -> int:
    return next((int(p) for p in name.split(".") if p.isdigit()), -1)


PAYLOAD_FIELDS = ("q", "s", "lqer_qa", "lqer_qb", "lqer_sa", "lqer_sb", "awq_s", "t")


def payload_order(qstate: dict) -> list:
    """(name, field) pairs in the order their bytes are written."""
    pairs = [(n, f) for n, e in qstate.items() for f in PAYLOAD_FIELDS if f in e]
    key = lambda p: (PAYLOAD_FIELDS.index(p[1]), weight_type(p[0]), layer_index(p[0]), p[0])
    return sorted(pairs, key=key)


def stored_bytes(field: str, t: torch.Tensor) -> bytes:
    """Payload form of one tensor. Codes go column-major: a column belongs to one input feature,
    so its codes share a magnitude and brotli's context model sees runs of alike bytes (-2% of
    the blob, mostly mlp.proj and tok_emb). fp16 goes as a low-byte plane then a high-byte plane."""
    t = t.T if field == "q" and t.ndim == 2 else t
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if t.dtype == torch.float16:
        b = np.frombuffer(b, np.uint8).reshape(-1, 2).T.tobytes()
    return b


def from_stored(field: str, buf: bytes, dtype: str, shape: list) -> torch.Tensor:
    """Inverse of stored_bytes."""
    if dtype == "float16":
        buf = np.frombuffer(buf, np.uint8).reshape(2, -1).T.tobytes()
    cols = field == "q" and len(shape) == 2
    t = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    t = t.view(getattr(torch, dtype)).reshape(shape[::-1] if cols else shape)
    return t.T.contiguous() if cols else t


def compress_payload(raw: bytes, pieces: int = 16) -> bytes:
    """Brotli-11 on `pieces` contiguous slices in parallel threads (it runs ~0.2 MB/s on one core
    and releases the GIL; slicing costs ~0.05 % of size). Layout: count, sizes, streams."""
    step = -(-len(raw) // pieces)
    with ThreadPoolExecutor(pieces) as pool:
        streams = list(pool.map(lambda b: brotli.compress(b, quality=11, lgwin=24),
                                [raw[i:i + step] for i in range(0, len(raw), step)]))
    sizes = np.array([len(s) for s in streams], dtype="<u4")
    return np.uint32(len(streams)).tobytes() + sizes.tobytes() + b"".join(streams)


def decompress_payload(blob: bytes) -> bytes:
    n = int(np.frombuffer(blob[:4], "<u4")[0])
    sizes = np.frombuffer(blob[4:4 + 4 * n], "<u4")
    offsets = [4 + 4 * n] + (4 + 4 * n + np.cumsum(sizes, dtype=np.int64)).tolist()
    with ThreadPoolExecutor(n) as pool:
        return b"".join(pool.map(lambda i: brotli.decompress(blob[offsets[i]:offsets[i + 1]]), range(n)))


def serialize(qstate: dict, h, meta: dict | None = None) -> bytes:
    """qstate -> bytes, deterministic: the same qstate and meta always give the same bytes.
    Layout: magic, version, compressor, checksum, uint32 length + brotli JSON of `meta` (the
    configuration, see artifact_meta), the compressed payload."""
    entries = [[n, {k: v for k, v in e.items() if not isinstance(v, torch.Tensor)}]
               for n, e in qstate.items()]
    records, chunks = [], []
    for n, f in payload_order(qstate):
        t = qstate[n][f]
        records.append([n, f, str(t.dtype).removeprefix("torch."), list(t.shape)])
        chunks.append(stored_bytes(f, t))
    index = json.dumps({"entries": entries, "records": records}, separators=(",", ":"))
    index = index.encode()
    raw = np.uint32(len(index)).tobytes() + index + b"".join(chunks)
    payload = compress_payload(raw)
    info = brotli.compress(json.dumps(meta or {}, sort_keys=True).encode(), quality=11)
    head = QUANT_MAGIC + bytes([QUANT_VERSION, BROTLI])
    return head + hashlib.sha256(info + raw).digest()[:8] + np.uint32(len(info)).tobytes() + info + payload


def split_blob(blob: bytes) -> tuple:
    """(meta bytes, compressed payload) of a container; refuses another magic or version."""
    if blob[:4] != QUANT_MAGIC or len(blob) < 18:
        raise ValueError("not a quantized model file (bad magic)")
    if blob[4] < QUANT_VERSION:
        raise ValueError(f"quantized model format version {blob[4]} carries no configuration; this "
                         f"code reads version {QUANT_VERSION}: score it with the train_gpt.py that "
                         "wrote it, or retrain")
    if blob[4] != QUANT_VERSION or blob[5] != BROTLI:
        raise ValueError(f"quantized model format {blob[4]}/{blob[5]}, this code reads "
                         f"version {QUANT_VERSION} with compressor {BROTLI} (brotli)")
    n = int(np.frombuffer(blob[14:18], "<u4")[0])
    return blob[18:18 + n], blob[18 + n:]


def read_meta(blob: bytes) -> dict:
    """The configuration block alone (cheap: the payload is not decompressed)."""
    return json.loads(brotli.decompress(split_blob(blob)[0]))


def deserialize(blob: bytes) -> dict:
    """Inverse of serialize(): the qstate (read_meta gives the configuration)."""
    info, payload = split_blob(blob)
    raw = decompress_payload(payload)
    if hashlib.sha256(info + raw).digest()[:8] != blob[6:14]:
        raise ValueError("quantized model payload is corrupted (checksum mismatch)")
    n = int(np.frombuffer(raw[:4], dtype="<u4")[0])
    index = json.loads(raw[4 : 4 + n])
    qstate = {name: dict(small) for name, small in index["entries"]}
    pos = 4 + n
    for name, key, dtype, shape in index["records"]:
        size = getattr(torch, dtype).itemsize * math.prod(shape)
        qstate[name][key] = from_stored(key, raw[pos : pos + size], dtype, shape)
        pos += size
    return qstate


def artifact_meta(h: Hyperparameters, data_identity: str) -> dict:
    """What an artifact carries about itself: its model and eval fields, the config hash, the
    source that wrote it and the data it was trained on."""
    return dict(config={k: getattr(h, k) for k in ARCH_FIELDS + EVAL_FIELDS},
                config_hash=h.config_hash(data_identity), data=data_identity, run_id=h.run_id,
                source_sha256=source_sha256())


def artifact_config(h: Hyperparameters, meta: dict) -> tuple:
    """EVAL_ONLY: the artifact's model and eval fields replace what the env left at its defaults.
    An env var that sets a model field to another value is an error; one that sets an eval field
    is an override, returned as {NAME: (artifact value, used value)}. Eval fields the artifact
    lacks (added since) keep their current value."""
    stored, env, path = meta.get("config"), h.env_overrides, h.eval_only
    if not stored:
        raise ValueError(f"EVAL_ONLY={path}: the artifact carries no configuration")
    unknown = sorted(set(stored) - set(ARCH_FIELDS + EVAL_FIELDS))
    missing = [k for k in ARCH_FIELDS if k not in stored]
    if unknown or missing:
        raise ValueError(f"EVAL_ONLY={path}: written by another version of this script (fields "
                         f"unknown here {unknown}, missing there {missing}); score it with that one")
    values, overrides = {}, {}
    for k in [k for k in ARCH_FIELDS + EVAL_FIELDS if k in stored]:
        name, theirs = k.upper(), stored[k]
        if name not in env:
            values[k] = theirs
        elif getattr(h, k) != theirs and k in ARCH_FIELDS:
            raise ValueError(f"{name}={env[name]} disagrees with EVAL_ONLY={path}, which was trained "
                             f"with {name}={theirs}: unset {name}")
        elif getattr(h, k) != theirs:
            overrides[name] = (theirs, getattr(h, k))
    resolved = dataclasses.replace(h, **values)
    resolved.env_overrides = env
    return resolved, overrides


def calibration_rows(spec: DataSpec, h: Hyperparameters, d: Dist):
    """GPTQ calibration: GPTQ_CALIBRATION_BATCHES global batches of 8 random training slots (the
    same draw on every world size; rank r takes its slots). Never validation data."""
    rng = np.random.default_rng(h.seed)
    shards = [read_shard(f) for f in spec.train_files]
    sizes = np.array([s.size for s in shards], dtype=np.float64)
    for b in range(8 * h.gptq_calibration_batches):
        i = rng.choice(len(shards), p=sizes / sizes.sum())
        start = int(rng.integers(0, max(shards[i].size - h.slot_tokens, 1)))
        if (b % 8) // d.grad_accum == d.rank:
            yield torch.from_numpy(shards[i][start:start + h.slot_tokens].astype(np.int64))[None]


def add_gram(hess: dict, name: str, x: torch.Tensor):
    x = x.flatten(0, -2).float()
    if name not in hess:
        hess[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
    hess[name].addmm_(x.T, x)


@torch.no_grad()
def collect_hessians(model: GPT, spec: DataSpec, h: Hyperparameters, d: Dist) -> dict:
    """H = mean of X^T X over calibration rows for every matrix input (tok_emb: the final-norm
    output that feeds the tied head). Runs an eager copy of the model so hooks see every call,
    looped layers included (loop on whenever NUM_LOOPS > 0, as the artifact is scored, even if
    training stopped before the loop switched on), and averages over ranks so every rank
    quantizes identically."""
    calib = GPT(h, model.bos_id, model.backend).to(d.device)
    calib.load_state_dict(model.state_dict())
    calib.looping, hess = h.num_loops > 0, {}  # the state the scored model runs (scoring_state)
    for name, mod in calib.named_modules():
        if isinstance(mod, Attention):  # c_q, c_k, c_v read the attention input (Attention.qkv)
            mod.register_forward_hook(lambda m, inp, out, n=name + ".c_q.weight": add_gram(hess, n, inp[0]))
        elif isinstance(mod, CastedLinear):
            mod.register_forward_hook(lambda m, inp, out, n=name + ".weight": add_gram(hess, n, inp[0]))
    for x in calibration_rows(spec, h, d):
        add_gram(hess, "tok_emb.weight", calib.hidden(x.to(d.device)))
    for H in hess.values():
        all_reduce(H).div_(8 * h.gptq_calibration_batches)
    for q in [n for n in hess if n.endswith(".c_q.weight")]:  # one input, one Hessian for q, k, v
        for kv in ("c_k", "c_v"):
            hess[q.replace("c_q", kv)] = hess[q].clone()
    return hess


def save_prequant(path: str, sd: dict, h: Hyperparameters, looping: bool):
    """SAVE_PREQUANT: the float weights with the resolved config and the loop state, all that
    tools/ab.py needs to rebuild the model and rerun quantization and eval on the same weights."""
    torch.save(dict(state_dict={k: v.cpu() for k, v in sd.items()}, config=dataclasses.asdict(h),
                    looping=looping), path)


def load_artifact(path: str, h: Hyperparameters, d: Dist, bos_id: int, backend: str) -> GPT:
    """The model exactly as the artifact file encodes it (same GPT class, same forward)."""
    with open(path, "rb") as f:
        state = dequantize_state_dict(deserialize(f.read()))
    model = GPT(h, bos_id, backend).to(d.device)
    model.load_state_dict({k: v.to(d.device) for k, v in state.items()})
    model.trained_on_val = h.prequant_ttt_epochs > 0  # an ARCH field: the artifact carries it
    if d.device.type == "cuda":
        compile_model(model)
    return model


def artifact_accounting(path: str, h: Hyperparameters, log) -> dict:
    """Counted bytes = the file that is running (a packed launcher counts itself) + the blob."""
    code_path = os.path.abspath(__file__)
    acc = dict(code_bytes=os.path.getsize(code_path), model_bytes=os.path.getsize(path),
               code_sha256=sha256_file(code_path), model_sha256=sha256_file(path))
    acc["artifact_bytes"] = acc["code_bytes"] + acc["model_bytes"]
    log(f"artifact: code {acc['code_bytes']} B ({code_path}) + model {acc['model_bytes']} B = "
        f"{acc['artifact_bytes']} B, margin {ARTIFACT_CAP - acc['artifact_bytes']} B under "
        f"{ARTIFACT_CAP}; sha256 code {acc['code_sha256'][:16]} model {acc['model_sha256'][:16]}")
    if acc["artifact_bytes"] > ARTIFACT_CAP:  # scored anyway for diagnosis; main() exits 1 at the end
        log(f"ERROR: artifact {acc['artifact_bytes']} B exceeds the {ARTIFACT_CAP} B cap: run the "
            "packed file (tools/pack.py), set FIT_TO_CAP=1 or raise MLP_CLIP_SIGMAS. This run is "
            "not a valid submission.")
    return acc



# ------------------------------------------------------------------------------------------------
# Evaluation
# The scoring passes over the val stream (diagnostic windows, sliding windows, phased LoRA
# TTT), each through evaluate(): its timer phase and its C3/C4 ledger.
# ------------------------------------------------------------------------------------------------


def on_device(val: ValData, device) -> ValData:
    return ValData(val.tokens.to(device), val.target_bytes.to(device), val.bos_id)


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """Small per-step host arrays: pinned and non-blocking, so the GPU queue never drains."""
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def window_rows(tokens, ws, we, ss, rows: int, length: int):
    """Rows of inputs tokens[ws:we], left-aligned and right-padded with id 0 to `length`, their
    next-token targets, each position's target index, and the mask of scored targets [ss, we).
    ws, we, ss are numpy arrays of at most `rows` windows; missing rows are empty."""
    bounds = np.zeros((3, rows), np.int64)
    bounds[:, :len(ws)] = ws, we, ss
    ws, we, ss = to_device(bounds, tokens.device)
    idx = ws[:, None] + torch.arange(length, device=tokens.device)
    valid = idx < we[:, None]
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    x, y = torch.where(valid, tokens[idx], 0), torch.where(valid, tokens[idx + 1], 0)
    return x, y, idx, valid & (idx >= ss[:, None])


# Token-only online n-gram tilt (PR #2140/#2135; the channel accepted in the #1967 review): one
# hinted token per target, from the same document's earlier tokens only, boosts the full
# softmax (ngram_tilt in the head). Documents never share state, so the scores stay causal in
# any scoring order, and documents stay isolated (tools/legality.py checks both).


def ngram_hints(val: ValData, starts: np.ndarray, h) -> torch.Tensor:
    """Hint of every target (-1 = none): after the earlier occurrences, in its document, of its
    context tokens[i-L+1..i] (L = NGRAM_ORDER - 1), the most frequent next token (ties: the first
    to reach the top count), if it followed >= NGRAM_THRESHOLD of them (PR #2135's token rule).
    Vectorized: L passes of a rolling int64 hash, then two stable sorts (by context, by context
    and next token) and cummax scans. Memory ~12 int64 arrays of the target count (~4.6 GB for
    47.8M targets); runs once per eval, inside the eval timer."""
    t, n, L, dev = val.tokens.long(), val.num_targets, h.ngram_order - 1, val.tokens.device
    hints = torch.full((n,), -1, dtype=torch.long, device=dev)
    pos, st = torch.arange(n, device=dev), torch.from_numpy(starts).to(dev)
    doc = torch.bucketize(pos, st, right=True) - 1
    key = doc.clone()  # the document is part of the context: documents never share counts
    for m in range(L):
        key = key * 1099511628211 + t[(pos - m).clamp_min(0)]  # wraps mod 2^64
    sel = pos[pos - (L - 1) >= st[doc]]  # the whole context lies in the document
    if sel.numel() == 0:
        return hints
    order = torch.argsort(key[sel], stable=True)
    p, g = sel[order], key[sel][order]
    nxt, i = t[p + 1], torch.arange(p.numel(), device=dev)
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=dev), g[1:] != g[:-1]])
    grp, seen = first.cumsum(0), i - torch.cummax(torch.where(first, i, 0), 0).values
    pair = grp * h.vocab_size + nxt  # count of (context, next) so far, in stream order
    o2 = torch.argsort(pair, stable=True)
    f2 = torch.cat([torch.ones(1, dtype=torch.bool, device=dev), pair[o2][1:] != pair[o2][:-1]])
    count = torch.empty_like(p)
    count[o2] = i - torch.cummax(torch.where(f2, i, 0), 0).values + 1
    top = torch.cummax(grp * (n + 1) + count, 0).values - grp * (n + 1)  # after each element
    prev_top = torch.where(first, 0, top.roll(1))
    lead = torch.cummax(torch.where(count > prev_top, i, 0), 0).values  # holder of the top count
    gate = ~first & (prev_top.float() / seen.clamp_min(1).float() >= h.ngram_threshold)
    hints[p[gate]] = nxt[lead.roll(1)[gate]]
    return hints


def tilt_hints(vd: ValData, h, log):
    """(the stream's hints, NGRAM_BOOST) when NGRAM_BOOST > 0, else None (no tilt)."""
    if not h.ngram_boost:
        return None
    hints = ngram_hints(vd, find_docs(vd.tokens, vd.bos_id)[0], h)
    log(f"ngram_tilt: {int((hints >= 0).sum())} of {vd.num_targets} targets hinted, boost {h.ngram_boost:g}")
    return hints, h.ngram_boost


def tilt_rows(tilt, idx):
    """The tilt of the rows whose targets are `idx` (GPT.forward's `tilt`)."""
    return None if tilt is None else (tilt[0][idx], tilt[1])


@torch.no_grad()
def eval_val(model: GPT, val: ValData, h: Hyperparameters, d: Dist, led: ScoreLedger, log) -> Score:
    """Non-overlapping diagnostic eval: the stream cut into windows of one training slot
    (documents still attend only within themselves), one per forward, dealt round-robin to ranks."""
    n, L, vd = val.num_targets, h.slot_tokens, on_device(val, d.device)
    acc = torch.zeros(3, dtype=torch.float64, device=d.device)
    for w in range(d.rank, -(-n // L), d.world_size):
        ws = np.array([w * L])
        we = np.minimum(ws + L, n)
        x, y, idx, scored = window_rows(vd.tokens, ws, we, ws, 1, L)
        acc += account(led, vd.target_bytes, model(x, y), idx, scored, np.stack([[-1], ws, we], 1))
    return reduce_score(*acc)


# Sliding windows (spec 6.2): every target once, each after at least L - stride tokens of its
# document (the forward keeps documents apart, so windows need not align with them).


def sliding_windows(n: int, length: int, stride: int):
    """Window w ends at min(length + w stride, n) and scores the targets after the previous
    window's end: the first all of its targets, every other one its last `stride`."""
    ends = np.minimum(length + stride * np.arange(1 + max(0, -(-(n - length) // stride))), n)
    return ends, np.concatenate([[0], ends[:-1]])


@torch.no_grad()
def eval_sliding(model: GPT, val: ValData, h: Hyperparameters, d: Dist, led: ScoreLedger, log) -> Score:
    """Batches of a fixed [rows, EVAL_SEQ_LEN] shape, dealt round-robin to ranks."""
    L, rows = h.eval_seq_len, max(1, h.val_batch_tokens // 8 // h.eval_seq_len)
    ends, firsts = sliding_windows(val.num_targets, L, h.eval_stride)
    vd = on_device(val, d.device)
    acc, tilt = torch.zeros(3, dtype=torch.float64, device=d.device), tilt_hints(vd, h, log)
    for b in range(d.rank, -(-ends.size // rows), d.world_size):
        we, ss = ends[b * rows:(b + 1) * rows], firsts[b * rows:(b + 1) * rows]
        x, y, idx, scored = window_rows(vd.tokens, np.maximum(we - L, 0), we, ss, rows, L)
        table = np.stack([np.full_like(we, -1), ss, we], 1)
        acc += account(led, vd.target_bytes, model(x, y, None, tilt_rows(tilt, idx)), idx, scored, table)
    log(f"sliding: {ends.size} windows of {L} stride {h.eval_stride}, {rows} rows per forward")
    return reduce_score(*acc)


# Per-document LoRA TTT (spec 6.4, PR #1530) with phased global SGD (spec 6.5, PR #1610/#1626).
# Documents sorted by length are cut into batches, queue longest first; each rank takes every
# world_size-th batch of a phase segment (static, so no shared files). Per chunk: score first, then
# one AdamW step.


def ttt_queue(lengths: np.ndarray, batch_size: int) -> list:
    order = np.argsort(lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, order.size, batch_size)]
    return sorted(batches, key=lambda b: -lengths[b].max())


def phase_cuts(queue: list, h: Hyperparameters) -> list:
    """(batches scored, boundary b_i) of each global SGD pause: the first batch end where the
    scored-doc count reaches b_i = floor(P (i+1) / K). Set by the queue alone, so the pauses and
    the scores do not depend on the number of ranks."""
    K, P = h.phased_ttt_num_phases, h.phased_ttt_prefix_docs
    done = np.cumsum([b.size for b in queue])
    cuts = [(int(np.searchsorted(done, P * (i + 1) // K)) + 1, P * (i + 1) // K)
            for i in range(K if P else 0)]
    return [c for c in cuts if c[0] < len(queue)]  # a pause with nothing left to score is moot


@dataclass
class Lora:
    """fp32 adapter pairs (A [rows, r, in], B [rows, out, r]), one row per document: per virtual
    layer {target: pair} for the q, k, v, o, mlp of TTT_LORA_TARGETS, and the LM head's (None if
    not a target). Targets left out do not exist, so they cost nothing. Outputs scale by alpha / r."""
    scale: float
    layers: list
    head: tuple | None

    def pairs(self) -> list:
        head = [] if self.head is None else [self.head]
        return [ab for layer in self.layers for ab in layer.values()] + head

    @torch.no_grad()
    def reset(self, seed):
        """B <- 0 (no change to the model); A <- U(+-1/sqrt(in)) drawn from `seed`, or kept if None."""
        pairs = self.pairs()
        gen = None if seed is None or not pairs else torch.Generator(pairs[0][0].device).manual_seed(seed)
        for a, b in pairs:
            b.zero_()
            if gen is not None:
                a.uniform_(-a.size(-1) ** -0.5, a.size(-1) ** -0.5, generator=gen)

    def view(self, dtype) -> dict:
        """The adapters as GPT.forward takes them, cast to the compute dtype (the fp32 masters train)."""
        cast = lambda ab: (ab[0].to(dtype), ab[1].to(dtype))  # noqa: E731
        layers = [dict({k: cast(ab) for k, ab in layer.items()}, scale=self.scale) for layer in self.layers]
        head = {} if self.head is None else {"head": cast(self.head)}
        return dict(scale=self.scale, layers=layers, **head)


def new_lora(model: GPT, h: Hyperparameters, rows: int, device) -> Lora:
    """Zero adapters of TTT_LORA_TARGETS for every virtual layer position (all inputs are
    MODEL_DIM wide); reset() draws A."""
    dm, kv, r, want = h.model_dim, h.num_kv_heads * h.head_dim, h.ttt_lora_rank, lora_targets(h)
    pair = lambda out: tuple(torch.zeros(shape, device=device, requires_grad=True)  # noqa: E731
                             for shape in ((rows, r, dm), (rows, out, r)))
    outs = dict(q=dm, k=kv, v=kv, o=dm, mlp=dm)
    layers = [{k: pair(n) for k, n in outs.items() if k in want} for _ in model.layer_order(model.looping)]
    return Lora(h.ttt_lora_alpha / r, layers, pair(h.vocab_size) if "head" in want else None)


def ttt_bucket(n: int, length: int) -> int:
    """Window lengths are padded to length/8, /4, /2 or length, rounded up to a multiple of 128 (flex
    blocks; 2560/8 = 320 -> 384) and at least 128: four compiled shapes, and short documents do not
    pay for 2048-token rows."""
    sizes = [min(length, max(128, -(-(length >> k) // 128) * 128)) for k in range(4)]
    return min(b for b in sizes if b >= n)


def batch_chunk(lens: np.ndarray, h: Hyperparameters) -> int:
    """Chunk size of a batch (PR #2014): the first TTT_CHUNK_SCHEDULE entry whose LEN covers the
    batch's longest doc in tokens (BOS to next BOS = targets + 1, as #2014 counts), else
    TTT_CHUNK_SIZE. One size per batch, as in #2014: batches hold docs of similar length."""
    longest = int(lens.max()) + 1
    return next((c for n, c in chunk_schedule(h.ttt_chunk_schedule) if longest <= n), h.ttt_chunk_size)


def chunk_plan(docs, starts, ends, c: int, size: int, h: Hyperparameters) -> dict:
    """Chunk c (of `size` targets) of every row: targets [cs, ce), window [ws, ce); `step` = the
    doc has more chunks."""
    s = np.where(docs >= 0, starts[np.maximum(docs, 0)], 0)
    e = np.where(docs >= 0, ends[np.maximum(docs, 0)], 0)
    cs = s + c * size
    live = cs < e
    ce = np.where(live, np.minimum(cs + size, e), 0)
    ws = np.where(live, np.maximum(s, ce - h.ttt_eval_seq_len), 0)
    return dict(doc=docs, s=s, ws=ws, cs=np.where(live, cs, 0), ce=ce, live=live, step=live & (ce < e))


def ttt_chunk(model, lora, opt, vd: ValData, p: dict, h, led, tilt):
    """Score the chunk's targets with the current adapters, THEN one AdamW step on the sum over
    documents of their mean chunk loss (documents with later chunks only; none without adapters)."""
    L = ttt_bucket(int((p["ce"] - p["ws"]).max()), h.ttt_eval_seq_len)
    x, y, idx, scored = window_rows(vd.tokens, p["ws"], p["ce"], p["cs"], h.ttt_batch_size, L)
    nll = model(x, y, lora.view(model.compute_dtype), tilt_rows(tilt, idx))
    score_rows = np.stack([p["doc"], p["cs"], p["ce"]], 1)[p["live"]]
    sums = account(led, vd.target_bytes, nll, idx, scored, score_rows)
    if p["step"].any() and opt is not None:
        w = to_device(p["step"].astype(np.float32), nll.device)
        ((nll * scored).sum(1) / scored.sum(1).clamp_min(1) * w).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        led.record("update", np.stack([p["doc"], p["s"], p["ce"]], 1)[p["step"]])
    return sums


def ttt_batch(model, lora, docs, starts, ends, vd, h, led, tilt):
    """One batch: fresh optimizer state (B was zeroed by the caller), chunks in order."""
    params = [t for ab in lora.pairs() for t in ab]
    lr = h.ttt_lora_lr * h.ttt_local_lr_mult
    opt = torch.optim.AdamW(params, lr=lr, betas=(TTT_BETA1, h.ttt_beta2), eps=1e-10,
                            weight_decay=h.ttt_weight_decay, fused=vd.tokens.is_cuda) if params else None
    size = batch_chunk(ends[docs] - starts[docs], h)
    docs = np.pad(docs, (0, h.ttt_batch_size - docs.size), constant_values=-1)
    sums = torch.zeros(3, dtype=torch.float64, device=vd.tokens.device)
    for c in range(chunks_of(docs, starts, ends, h)):
        sums += ttt_chunk(model, lora, opt, vd, chunk_plan(docs, starts, ends, c, size, h), h, led, tilt)
    return sums


def chunks_of(docs, starts, ends, h) -> int:
    lens = ends[docs[docs >= 0]] - starts[docs[docs >= 0]]
    return -(-int(lens.max()) // batch_chunk(lens, h))


@dataclass
class Progress:
    """One rank's TTT state: score sums, scored docs as (batch, position, doc), chunk steps done
    and left (the seconds are the Timer's phases)."""
    acc: torch.Tensor
    steps_left: int
    done: list = field(default_factory=list)
    batches: int = 0
    steps_done: int = 0

    def add_batch(self, b: int, docs, sums, steps: int):
        self.acc += sums
        self.done += [(b, i, int(doc)) for i, doc in enumerate(docs)]
        self.batches += 1
        self.steps_done += steps
        self.steps_left -= steps


def scored_prefix(done: list, bound: int, d: Dist) -> np.ndarray:
    """Ids of the first `bound` docs in scoring order (batch, position), gathered from all ranks."""
    rows = torch.tensor(done, dtype=torch.long).reshape(-1, 3).to(d.device)
    if d.world_size > 1:
        n = int(all_reduce(torch.tensor([len(rows)], device=d.device), dist.ReduceOp.MAX).item())
        padded = torch.cat([rows, rows.new_full((n - len(rows), 3), -1)])
        parts = [torch.empty_like(padded) for _ in range(d.world_size)]
        dist.all_gather(parts, padded)
        rows = torch.cat(parts)
        rows = rows[rows[:, 0] >= 0]
    rows = rows.cpu().numpy()
    return rows[np.lexsort((rows[:, 1], rows[:, 0]))[:bound], 2]


def stream_step(model: GPT, stream, lo: int, hi: int, h, d: Dist, opt, lr: float):
    """One optimizer step on the targets of stream[lo:hi] (inputs; targets shifted by one). Rows
    of TTT_EVAL_SEQ_LEN are dealt round-robin to ranks in micro-batches of a fixed shape; the loss
    is the mean over the chunk, so summed gradients give the same step for any world size."""
    L = h.ttt_eval_seq_len
    per_chunk = -(-h.global_ttt_chunk_tokens // L)
    mb = -(-min(h.global_ttt_batch_seqs, per_chunk) // d.world_size)
    mine = np.arange(lo, hi, L)[d.rank::d.world_size]
    for i in range(0, mine.size, mb):
        ws = mine[i:i + mb]
        x, y, _, m = window_rows(stream, ws, np.minimum(ws + L, hi), ws, mb, L)
        ((model(x, y) * m).sum() / (hi - lo)).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if d.world_size > 1:
        sums = all_reduce_flat([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        for p, g in zip(params, sums):
            p.grad = g
    torch.nn.utils.clip_grad_norm_(params, GLOBAL_TTT_GRAD_CLIP)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def cosine(peak: float, i: int, n: int) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * i / n))


def stream_steps(model: GPT, stream, spans: list, h, d: Dist, opt, budget, log, tag: str) -> int:
    """stream_step on each (lo, hi, lr) of `spans`, stopping when `budget` (if any) would run out."""
    for steps, (lo, hi, lr) in enumerate(spans):
        if budget is not None and budget.left() <= 0:
            log(f"{tag}: stopped after {steps} of {len(spans)} steps "
                f"(EVAL_BUDGET_SECONDS={h.eval_budget_seconds:g} would be exceeded)")
            return steps
        stream_step(model, stream, lo, hi, h, d, opt, lr)
    return len(spans)


def global_sgd(model: GPT, stream, h: Hyperparameters, d: Dist, budget, log, tag: str) -> int:
    """SGD with momentum on every base weight over `stream` (the prefix docs' tokens, in scoring
    order): one step per GLOBAL_TTT_CHUNK_TOKENS chunk, the last chunk skipped, LR cosine over
    chunks. The forward is GPT.forward, documents kept apart by its BOS masking."""
    ct = h.global_ttt_chunk_tokens
    n = -(-(stream.numel() - 1) // ct) - 1  # chunks stepped on
    spans = [(c * ct, (c + 1) * ct, cosine(h.global_ttt_lr, c, n)) for _ in range(GLOBAL_TTT_EPOCHS)
             for c in range(n)]
    opt = torch.optim.SGD(model.parameters(), lr=h.global_ttt_lr, momentum=GLOBAL_TTT_MOMENTUM)
    model.requires_grad_(True)
    steps = stream_steps(model, stream, spans, h, d, opt, budget, log, tag)
    model.requires_grad_(False)
    return steps


def ttt_pause(model, val, starts, ends, bound, phase, prog: Progress, h, d, led, log, budget):
    """Phase pause: align clocks, take the first `bound` scored docs, global SGD on them."""
    led.sync()
    # the scoring left, at the pace so far (conservative: later batches use shorter windows)
    budget.reserve = budget.phases["ttt_lora_scoring"] / max(prog.steps_done, 1) * prog.steps_left
    prefix = scored_prefix(prog.done, bound, d)
    if budget.left() <= 0:
        log(f"ttpp: phase:{phase + 1} skipped (budget: projected scoring {budget.reserve:.0f}s left)")
        return
    led.record("update", np.stack([prefix, starts[prefix], ends[prefix]], 1))
    n = val.num_targets  # the stream's last doc keeps its final token
    with budget.phase(f"ttt_phase{phase + 1}_global_sgd"):
        stream = torch.cat([val.tokens[starts[k]:ends[k] + (ends[k] == n)] for k in prefix]).to(d.device)
        steps = global_sgd(model, stream, h, d, budget, log, f"tttg phase:{phase + 1}")
    log(f"ttpp: phase:{phase + 1} docs:{prefix.size} tokens:{stream.numel()} sgd_steps:{steps} "
        f"t:{budget.elapsed():.1f}s")


def ttt_eval(model: GPT, val: ValData, h: Hyperparameters, d: Dist, led: ScoreLedger, log,
             budget=None) -> Score:
    """Phased LoRA TTT: the score of the record. A is redrawn at each phase start (and each batch
    without TTT_WARM_START_A) from a seed of the phase (batch), so ranks draw the same A."""
    starts, ends = find_docs(val.tokens, val.bos_id)
    queue, vd = ttt_queue(ends - starts, h.ttt_batch_size), on_device(val, d.device)
    cuts, budget = phase_cuts(queue, h), budget or Timer(d.device, h.eval_budget_seconds)
    tilt = tilt_hints(vd, h, log)  # inside the eval timer
    log(f"ttt_phased: docs:{starts.size} batches:{len(queue)} boundaries:{[b for _, b in cuts]} "
        f"pause_after_batch:{[c for c, _ in cuts]} world_size:{d.world_size}")
    model.requires_grad_(False)
    lora, begin = new_lora(model, h, h.ttt_batch_size, d.device), 0
    steps = [chunks_of(b, starts, ends, h) for b in queue]
    prog = Progress(torch.zeros(3, dtype=torch.float64, device=d.device), sum(steps[d.rank::d.world_size]))
    for phase, (cut, bound) in enumerate(cuts + [(len(queue), None)]):
        lora.reset(h.seed * 1000 + phase)
        with budget.phase("ttt_lora_scoring"):
            for b in range(begin + d.rank, cut, d.world_size):
                lora.reset(None if h.ttt_warm_start_a else h.seed * 1000003 + b)
                sums = ttt_batch(model, lora, queue[b], starts, ends, vd, h, led, tilt)
                prog.add_batch(b, queue[b], sums, steps[b])
                if prog.batches % max(1, len(queue) // (20 * d.world_size)) == 0:
                    s, lens = Score(*prog.acc.tolist()), ends[queue[b]] - starts[queue[b]]  # this rank's
                    log(f"ttp: b{b + 1}/{len(queue)} dl:{lens.min()}-{lens.max()} rl:{s.loss:.4f} "
                        f"rb:{s.bpb:.4f} t:{budget.elapsed():.1f}s")
        if bound is not None:
            ttt_pause(model, val, starts, ends, bound, phase, prog, h, d, led, log, budget)
        begin = cut
    sgd_s = sum(v for k, v in budget.phases.items() if k.endswith("_global_sgd"))
    log(f"ttt done at eval clock {budget.elapsed():.1f}s (rank 0: LoRA scoring "
        f"{budget.phases['ttt_lora_scoring']:.1f}s, global SGD {sgd_s:.1f}s)")
    return reduce_score(*prog.acc)


# The one scoring step every eval goes through: its own timer phase and C3/C4 ledger.


def evaluate(name: str, fn, model: GPT, val: ValData, h: Hyperparameters, d: Dist, log, timer: Timer) -> tuple:
    """One scoring pass `fn` (eval_val, eval_sliding or ttt_eval) over the val stream, in its own
    timer phase and C3/C4 ledger. Returns (Score, legality): "compliant" or what failed."""
    starts, ends = find_docs(val.tokens, val.bos_id)
    led, before = ScoreLedger(val.num_targets, d.device), timer.phases.get(name, 0.0)
    if model.trained_on_val:  # prequant_ttt trained on every target before this pass
        led.record("update", np.stack([np.arange(starts.size), starts, ends], 1))
    with timer.phase(name):
        score = fn(model, val, h, d, led, log)
    c = check_ledger(led, starts)
    log(f"{name} val_loss: {score.loss:.6f} val_bpb: {score.bpb:.6f} tokens {score.tokens} bytes {score.bytes} "
        f"of {val.num_targets} targets ({timer.phases[name] - before:.1f}s) C3:{'ok' if c['C3'] else 'FAIL'} "
        f"C4:{'ok' if c['C4'] else 'FAIL'}")
    if not c["C3"]:
        return score, ("C3: pre-quant TTT trained on val before scoring" if model.trained_on_val else
                       f"C3: {c['late_updates']} optimizer steps used tokens before they were scored")
    if not c["C4"]:
        return score, f"C4: {c['scored']} scores for {val.num_targets} targets, not each exactly once"
    return score, "compliant"


# ------------------------------------------------------------------------------------------------
# Training
# The clock runs only around optimizer steps: the compile warmups of the training and eval graphs
# (synthetic tokens, state restored afterwards) and evals are outside it. Progress is elapsed /
# (cap - GPTQ reserve), all-reduced with MAX every step so every rank switches the loop on and
# stops on the same step. Last, the pre-quant TTT research mode (ILLEGAL, off by default).
# ------------------------------------------------------------------------------------------------


def synthetic_batches(h: Hyperparameters, d: Dist, bos_id: int, gen: torch.Generator) -> list:
    """One step's micro-batches of synthetic tokens in documents of 300 tokens."""
    rows = [synthetic_tokens(h.slot_tokens + 1, h.vocab_size, bos_id, 300, gen).to(d.device)
            for _ in range(d.grad_accum)]
    return [(row[None, :-1], row[None, 1:]) for row in rows]


def forward_backward(model: GPT, batches: list) -> torch.Tensor:
    total = 0.0
    for x, y in batches:
        loss = model(x, y).mean()
        (loss / len(batches)).backward()
        total = total + loss.detach()
    return total / len(batches)


def compile_warmup(model: GPT, h: Hyperparameters, d: Dist, val_window: int) -> None:
    """Run every graph variant (loop off/on, each TRAIN_SEQ_SCHEDULE span, train and eval) on
    synthetic tokens, then restore the initial weights; the optimizers used here are thrown away."""
    opt, gen = Optimizers(model, d, h), torch.Generator().manual_seed(1234)
    spans = sorted({n for _, n in h.seq_plan} - {h.train_seq_len}) + [h.train_seq_len]
    with weights_restored(model):
        for model.looping, span in [(looping, span) for looping in (False, True) for span in spans]:
            model.seq_len, last = span, span == h.train_seq_len  # varlen kernels take the span: a graph each
            for _ in range(h.warmup_steps if last else 2):  # the last span also warms the optimizer step
                forward_backward(model, synthetic_batches(h, d, model.bos_id, gen))
                if last:
                    opt.step(1.0, h.muon_momentum_warmup_start)
                opt.zero_grad()
            with torch.no_grad():
                x, y = synthetic_batches(h, d, model.bos_id, gen)[0]
                model(x[:, :val_window], y[:, :val_window])
    model.looping = False


def scoring_state(model: GPT, h: Hyperparameters):
    model.looping = h.num_loops > 0  # the scored model always runs its loop, as in the records
    model.seq_len = h.score_seq_len  # eval windows longer than TRAIN_SEQ_LEN are not cut
    model.requires_grad_(False)


def eval_warmup(model: GPT, h: Hyperparameters, d: Dist, bos_id: int):
    """Compile every eval graph (diagnostic, sliding, LoRA fwd+bwd at each length bucket, global
    SGD) on random tokens, then restore the weights. LoRA TTT runs as world size 1 on every rank
    so that each rank compiles it; the rest runs on all ranks with their real shapes."""
    doc, gen = h.ttt_eval_seq_len + h.ttt_chunk_size + 1, torch.Generator().manual_seed(1234)
    tokens = synthetic_tokens(h.ttt_batch_size * doc + 1, h.vocab_size, bos_id, doc, gen)
    fake = ValData(tokens, torch.ones(tokens.numel() - 1, dtype=torch.long), bos_id)
    quiet, led = lambda *a, **k: None, ScoreLedger(fake.num_targets, d.device)
    solo = Dist(0, 1, d.local_rank, d.device)  # collectives still run, identically on all ranks
    with weights_restored(model):
        eval_val(model, fake, h, solo, led, quiet)
        if h.sliding_enabled:
            eval_sliding(model, fake, h, solo, led, quiet)
        if h.ttt_enabled:  # global SGD first: torch 2.13 crashes explaining a recompile from a
            # LoRA graph to a graph without adapters (it looks up lora['k'] in the new call's None)
            doc = h.global_ttt_chunk_tokens // 2 + 1
            stream = synthetic_tokens(4 * doc + 1, h.vocab_size, bos_id, doc, gen.manual_seed(1234))
            global_sgd(model, stream.to(d.device), h, d, None, quiet, "warmup")
            ttt_eval(model, fake, dataclasses.replace(h, phased_ttt_num_phases=0), solo, led, quiet)


def precompile_eval(model: GPT, h: Hyperparameters, d: Dist, bos_id: int):
    """Compile the eval graphs before training, on random tokens. The artifact's model (same
    classes, shapes and flags) reuses them, so its eval_warmup only runs them: the 63 graphs of
    the TTT eval took 297 s to compile on an H100 (bench/RESULTS.md). Then back to training."""
    scoring_state(model, h)
    eval_warmup(model, h, d, bos_id)
    model.looping, model.seq_len = False, h.train_seq_len
    model.requires_grad_(True)
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak_mem_mib reports training, not this warmup


def seq_span(frac: float, h: Hyperparameters) -> int:
    """Attention span of the step at training fraction `frac` (TRAIN_SEQ_SCHEDULE, PR #2014)."""
    return next((n for f, n in h.seq_plan if frac <= f), h.train_seq_len)


def rewarm(steps_since: int, h: Hyperparameters) -> float:
    """LR factor after a span change: linear from 1/N to 1 over N = SEQ_CHANGE_WARMUP_STEPS steps."""
    return min(1.0, (steps_since + 1) / max(h.seq_change_warmup_steps, 1))


def training_cap(h: Hyperparameters, world: int) -> float:
    """Seconds the training clock may run: the cap less the Hessians' reserve, since they read
    training data (spec 9.5). Each rank collects them on 8 / world of the calibration slots (29.9 s
    for 16 batches on one H100), so GPTQ_RESERVE_SECONDS scales by 8 / world and by batches / 16."""
    return h.max_wallclock_seconds - h.gptq_reserve_seconds * 8 / world * h.gptq_calibration_batches / 16


def train(model: GPT, h: Hyperparameters, d: Dist, spec: DataSpec, val: ValData, log, timer: Timer) -> dict:
    loader, opt = TrainLoader(spec.train_files, h.slot_tokens, d), Optimizers(model, d, h)
    ema = EMA(model, h.ema_decay, h.ema_warmup)
    timer.restart()  # the training clock
    cap_s = training_cap(h, d.world_size)
    step, loop_at, loop_s, elapsed, span_at = 0, None, 0.0, 0.0, -h.seq_change_warmup_steps
    while True:
        frac = elapsed / cap_s if h.max_wallclock_seconds > 0 else step / h.iterations
        if frac >= 1 or step >= h.iterations:
            break
        if not model.looping and h.num_loops > 0 and frac >= h.enable_looping_at:
            model.looping, loop_at, loop_s = True, step, elapsed
            log(f"layer_loop:enabled step:{step} frac:{frac:.3f} order:{model.layer_order(True)}")
        if seq_span(frac, h) != model.seq_len:  # progressive context (PR #2014), re-warm-up after a change
            model.seq_len, span_at = seq_span(frac, h), step if step else span_at
            log(f"seq_span:{model.seq_len} step:{step} frac:{frac:.3f}")
        loss = forward_backward(model, loader.next_step())
        opt.step(lr_multiplier(frac, h) * rewarm(step - span_at, h), muon_momentum(step, frac, h))
        opt.zero_grad()
        ema.update()
        step += 1
        elapsed = timer.slowest()
        if step <= 5 or step % h.train_log_every == 0:
            loss = all_reduce(loss.reshape(1)) / d.world_size  # mean over all 8 slots of the step
            log(f"{step}/{h.iterations} train_loss: {loss.item():.4f} train_time: {elapsed / 60:.2f}m "
                f"step_avg: {1000 * elapsed / step:.1f}ms tok/s: {step * h.train_batch_tokens / elapsed:.0f}")
        if h.val_loss_every and step % h.val_loss_every == 0:
            with timer.phase(None, pause=True):  # off the training clock
                evaluate("eval_periodic", eval_val, model, val, h, d, log, timer)
    cap = f"cap {cap_s:.1f}s" if h.max_wallclock_seconds > 0 else f"ITERATIONS={h.iterations}, no time cap"
    log(f"stopping: step {step} train_time {elapsed:.1f}s ({cap})")
    # the raw (pre-EMA) weights' score, as the record logs it: frozen weights and no gradients, so
    # the graphs precompile_eval compiled serve it; neither the model nor the EMA changes
    model.requires_grad_(False)
    raw, _ = evaluate("eval_raw", eval_val, model, val, h, d, log, timer)
    model.requires_grad_(True)
    ema.copy_to_model()
    pre_loop = 1000 * (loop_s / loop_at if loop_at else elapsed / max(step, 1))
    post_loop = 1000 * (elapsed - loop_s) / (step - loop_at) if loop_at is not None and step > loop_at else None
    return dict(steps=step, train_time_s=elapsed, step_avg_ms=1000 * elapsed / max(step, 1),
                step_avg_ms_noloop=pre_loop, step_avg_ms_loop=post_loop, loop_start_step=loop_at,
                tokens_per_s=step * h.train_batch_tokens / max(elapsed, 1e-12),
                val_bpb_raw=raw.bpb, val_loss_raw=raw.loss)


def prequant_ttt(model: GPT, val: ValData, h: Hyperparameters, d: Dist, log):
    """ILLEGAL research mode (PR #1376 ... #1735/#1738): AdamW on every weight over the val tokens
    for PREQUANT_TTT_EPOCHS epochs (LR cosine over epochs), before quantization and scoring. Every
    later score comes from a model trained on its targets (model.trained_on_val): evaluate() opens
    each ledger with that update, so C3 fails and the run is stamped "C3: pre-quant TTT ..."."""
    log(banner("NON-COMPLIANT: PREQUANT_TTT_EPOCHS>0 trains on val before scoring (C3). Research only, "
               "never a record."))
    stream, ct, n = val.tokens.to(d.device), h.global_ttt_chunk_tokens, val.num_targets
    opt = torch.optim.AdamW(model.parameters(), lr=h.prequant_ttt_lr, weight_decay=0.0)
    model.requires_grad_(True)
    for ep in range(h.prequant_ttt_epochs):
        lr = cosine(h.prequant_ttt_lr, ep, h.prequant_ttt_epochs)
        stream_steps(model, stream, [(lo, min(lo + ct, n), lr) for lo in range(0, n, ct)], h, d, opt, None,
                     log, "prequant_ttt")
        log(f"prequant_ttt: epoch {ep + 1}/{h.prequant_ttt_epochs} lr {lr:.2e}")
    model.trained_on_val = True


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def log_header(log, h: Hyperparameters, d: Dist, spec: DataSpec, val: ValData, backend: str):
    log(f"source_sha256: {source_sha256()}")
    log(source_text(), console=False)
    log(environment_report(d), console=False)
    log("Hyperparameters:")
    for k, v in sorted(dataclasses.asdict(h).items()):
        log(f"  {k}: {v}")
    if not h.eval_only:  # an eval-only run reports the artifact's (eval_only)
        log(f"config_hash: {h.config_hash(spec.identity)}")
    log(f"data: variant {spec.variant} byte_source {spec.byte_source} train_shards "
        f"{len(spec.train_files)} val_tokens {val.tokens.numel()} val_targets {val.num_targets} "
        f"val_bytes {int(val.target_bytes.sum())} manifest_sha256 {spec.manifest_sha256[:16]} "
        f"identity {spec.identity}")
    fused = "Triton (MLP, CE) when taking gradients" if triton is not None and d.device.type == "cuda" else "none"
    log(f"world_size {d.world_size} grad_accum {d.grad_accum} attention {backend} fused kernels {fused}")
    if d.device.type == "cuda" and backend != "fa3":
        log(banner("FlashAttention-3 (flash_attn_interface) is not used: attention runs on PyTorch's "
                   f"{backend} path.\n!!! Same math, slower steps: fewer steps fit the cap, so the score is "
                   "not record-comparable."))


FIT_TRIES = 3  # requantizations at most (each ~7 s GPTQ + ~7 s brotli on an H100)
FIT_SLACK_BYTES = 4096  # aim this far under the cap: the size rule is approximate
# (b, 2k) costs about what (b - 1, k) does (spec 5.3): past 2x the configured sigma every MLP weight
# has lost a bit, so the model is too big for the cap and no sigma should hide that.
FIT_MAX_SIGMA_RATIO = 2.0


def quantize_fit(sd: dict, hess: dict, h, budget: int, log, timer, meta: dict | None = None) -> tuple:
    """GPTQ + serialize. While the blob exceeds `budget` bytes (and FIT_TO_CAP), raise the MLP clip
    sigma by the size rule H ~ bits - log2(k) (spec 5.3): MLP codes shrink by n/8 * log2(k'/k)
    bytes. The record tuned k by hand to land just under the cap; this does it per run, at most
    FIT_TRIES times and up to FIT_MAX_SIGMA_RATIO x the configured k, and logs why it stopped.
    AWQ-lite's extra bytes are in the measured blob, and its int8 MLP columns (step k std / 127)
    shrink by the same log2(k'/k) bits as the rest, so n counts every MLP weight."""
    n_mlp = sum(t.numel() for n, t in sd.items() if tensor_class(n, t) == "mlp")
    k_max = FIT_MAX_SIGMA_RATIO * h.mlp_clip_sigmas
    for attempt in range(FIT_TRIES + 1):
        with timer.phase("gptq_quantize"):
            qstate = quantize_state_dict(sd, hess, h, log)
        with timer.phase("serialize"):
            blob = serialize(qstate, h, meta)  # stored_bytes moves every tensor to the CPU
        over = len(blob) - budget
        stops = ((over <= 0, "it fits"), (not h.fit_to_cap, "FIT_TO_CAP=0"),
                 (not n_mlp, "no MLP matrix to requantize"),
                 (attempt == FIT_TRIES, f"{FIT_TRIES} requantizations done"),
                 (h.mlp_clip_sigmas >= k_max, f"MLP_CLIP_SIGMAS reached its bound {k_max:.3f} "
                                              f"({FIT_MAX_SIGMA_RATIO:g} x the configured value)"))
        stop = next((why for hit, why in stops if hit), None)
        if stop:
            if attempt or over > 0:
                log(f"fit_to_cap: stopped ({stop}) at MLP_CLIP_SIGMAS {h.mlp_clip_sigmas:.3f}: model "
                    f"{len(blob)} B, budget {budget} B left by the code")
            return blob, h.mlp_clip_sigmas
        k = min(h.mlp_clip_sigmas * 2 ** (8 * (over * 1.1 + FIT_SLACK_BYTES) / n_mlp), k_max)
        log(f"fit_to_cap: model {len(blob)} B is {over} B over the {budget} B the code leaves; "
            f"requantizing with MLP_CLIP_SIGMAS {h.mlp_clip_sigmas:.3f} -> {k:.3f}")
        h = copy.copy(h)
        h.mlp_clip_sigmas = k


def code_room(code_path: str) -> int:
    """Bytes that the running file leaves the model under the cap. None left: refused before any
    training (FIT_TO_CAP could only requantize toward a useless model)."""
    room = ARTIFACT_CAP - os.path.getsize(code_path)
    if room <= 0:
        raise ValueError(f"{code_path} is {os.path.getsize(code_path)} B, which leaves no room for the "
                         f"model under the {ARTIFACT_CAP} B cap: run the packed file (tools/pack.py)")
    return room


def quantize_stage(model: GPT, spec: DataSpec, h, d, log, timer, stats: dict) -> tuple:
    """Hessians (training data, inside the training budget), GPTQ, serialize, write."""
    with timer.phase("gptq_hessians"):
        hess = collect_hessians(model, spec, h, d)
    train_total = stats["train_time_s"] + timer.phases["gptq_hessians"]
    cap = f" of {h.max_wallclock_seconds:.0f}s" if h.max_wallclock_seconds > 0 else " (no time cap)"
    log(f"gptq: {len(hess)} hessians in {timer.phases['gptq_hessians']:.1f}s; training + "
        f"hessians = {train_total:.1f}s{cap}")
    if h.max_wallclock_seconds and train_total > h.max_wallclock_seconds:
        log(f"WARNING: training data was read for {train_total:.1f}s, past the "
            f"{h.max_wallclock_seconds:.0f}s budget: raise GPTQ_RESERVE_SECONDS")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    budget = code_room(os.path.abspath(__file__))
    blob, mlp_sigmas = quantize_fit(sd, hess, h, budget, log, timer, artifact_meta(h, spec.identity))
    path = os.path.join(h.artifact_dir, "final_model.ptz")
    if d.is_main:
        os.makedirs(h.artifact_dir, exist_ok=True)
        with open(path, "wb") as f:
            f.write(blob)
        if h.save_prequant:
            save_prequant(os.path.join(h.artifact_dir, "final_model.pt"), sd, h, model.looping)
    if dist.is_initialized():
        dist.barrier()
    return path, dict(train_plus_hessians_s=train_total, mlp_clip_sigmas_used=mlp_sigmas,
                      quant_time_s=timer.phases["gptq_hessians"] + timer.phases["gptq_quantize"],
                      serialize_time_s=timer.phases["serialize"])


def setup(h: Hyperparameters):
    """Every input check comes before any GPU work: data and manifest, code size, attention."""
    spec = load_data_spec(h)
    code_room(os.path.abspath(__file__))
    backend = pick_attention_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                     h.attn_backend, h)
    d = init_distributed(h)
    log, timer = Logger(h.run_id, d.is_main), Timer(d.device)
    val = load_val_data(spec, h)
    log_header(log, h, d, spec, val, backend)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return spec, d, log, timer, val, backend


# Loop-off tokens/s per GPU at the record configuration (flex attention, bench-pack shards):
# bench/RESULTS.md. A run far below it is usually a throttled or shared GPU, not the code.
REFERENCE_TOK_S = {"H100": 1_040_000}


def throughput_check(stats: dict, h: Hyperparameters, world: int, gpu: str, log):
    per_gpu = h.train_batch_tokens / world / stats["step_avg_ms_noloop"] * 1000
    ref = next((v for k, v in REFERENCE_TOK_S.items() if k in gpu), None)
    log(f"throughput: {per_gpu:,.0f} tok/s per GPU before the loop"
        + (f" (reference {ref:,} on an {gpu} at the record configuration)" if ref else ""))
    if ref and per_gpu < 0.8 * ref:
        log(f"WARNING: throughput is {per_gpu / ref:.0%} of the reference: check GPU clocks "
            "(nvidia-smi -q -d CLOCK), other processes on the GPUs, and the attention backend")


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def log_graphs(counts: list, log) -> dict:
    """Graphs compiled by the warmups, inside the training clock, and after training (GPTQ
    calibration's flex kernel, eval). Every compile after the warmups costs clock time."""
    out = dict(warmup=counts[0], training=counts[1] - counts[0], after_training=counts[2] - counts[1])
    log(f"compiled graphs: {out}")
    if out["training"]:
        log(f"WARNING: {out['training']} graphs compiled inside the training clock: a shape or flag "
            "that compile_warmup does not cover")
    return out


# The challenge (spec 0): 8xH100, training <= 600 s (Hessians read training data, so they count),
# eval <= 600 s more, artifact <= 16,000,000 B. The data must be the published export: Issue
# #2127's local CaseOps prep trained on val docs 10k-50k (spec A.2). The val count of the plain
# SP8192 export is not pinned anywhere we trust (spec 1.4), so only CaseOps is known here.
TIME_CAP_S, RECORD_WORLD, RECORD_GPU = 600.0, 8, "H100"
PUBLISHED_DATA = {"caseops": (80, (47_851_520, 47_853_343))}  # variant -> train shards, val targets


def record_blockers(final: dict, h: Hyperparameters) -> list:
    """Short reasons why the run in `final` (a final_json) is not a record candidate; [] if it is."""
    mode = final["mode"]
    why = [] if mode == "train" else [f"mode {mode}: " + ("SMOKE run" if mode == "smoke" else "no training")]
    if final["world_size"] != RECORD_WORLD:
        why.append(f"world_size {final['world_size']}, not {RECORD_WORLD}")
    if RECORD_GPU not in final["gpu"]:
        why.append(f"gpu {final['gpu']}, not {RECORD_GPU}")
    if mode != "eval_only" and not 0 < h.max_wallclock_seconds <= TIME_CAP_S:
        why.append(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g}, not in (0, {TIME_CAP_S:g}]")
    if final.get("train_plus_hessians_s", 0.0) > TIME_CAP_S:
        why.append(f"training + Hessians {final['train_plus_hessians_s']:.1f}s > {TIME_CAP_S:g}s")
    if final["eval_strict_s"] > TIME_CAP_S:
        why.append(f"strict eval {final['eval_strict_s']:.1f}s > {TIME_CAP_S:g}s")
    if final["artifact_bytes"] > ARTIFACT_CAP:
        why.append(f"artifact {final['artifact_bytes']} B > {ARTIFACT_CAP} B")
    if final["legality"] != "compliant":
        why.append(f"legality: {final['legality']}")
    if not h.ttt_enabled:
        why.append("TTT_ENABLED=0")
    data, want = final["data"], PUBLISHED_DATA.get(final["data"]["variant"])
    if want is None:
        why.append(f"data variant {data['variant']}: no pinned val count (only CaseOps' export is known)")
    elif data["train_shards"] != want[0] or data["val_targets"] not in want[1]:
        why.append(f"data: {data['train_shards']} train shards, {data['val_targets']} val targets; the "
                   f"published {data['variant']} export has {want[0]} and {' or '.join(map(str, want[1]))}")
    return why


def final_evaluation(model: GPT, val: ValData, h: Hyperparameters, d: Dist, log, timer: Timer) -> dict:
    """Everything after training, on the model to score: compile warmup (random tokens), the
    non-overlapping diagnostic, sliding windows and phased LoRA TTT, each through evaluate().
    val_bpb is TTT's score, else sliding's, else the diagnostic's: a fixed precedence, never a
    minimum over evals (that would be multi-pass selection, C4). `timer` runs from the start of
    the strict eval (the artifact load): TTT's global SGD gets what the earlier stages left."""
    scoring_state(model, h)
    with timer.phase("eval_warmup"):
        eval_warmup(model, h, d, val.bos_id)
    log(f"eval_warmup: {timer.phases['eval_warmup']:.1f}s (random tokens, no val data)")
    out, legal = dict(val_bpb_sliding=None), []
    for name, on, fn in (("eval_diagnostic", True, eval_val), ("eval_sliding", h.sliding_enabled, eval_sliding),
                         ("eval_ttt", h.ttt_enabled, functools.partial(ttt_eval, budget=timer))):
        if on:
            (score, verdict), scored_by = evaluate(name, fn, model, val, h, d, log, timer), name
            out["val_bpb_" + name.removeprefix("eval_")], legal = score.bpb, legal + [verdict]
    legality, strict = next((v for v in legal if v != "compliant"), "compliant"), timer.slowest()
    if legality != "compliant":
        log(banner(f"NON-COMPLIANT evaluation: {legality}"))
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in timer.phases.items())
    log(f"eval timing: scoring only ({scored_by}) {timer.phases[scored_by]:.1f}s, strict total {strict:.1f}s "
        f"(slowest rank, from the artifact load; {parts})")
    out.update(val_bpb=score.bpb, val_loss=score.loss, scored_by=scored_by, tokens_scored=score.tokens,
               bytes_scored=score.bytes, eval_time_s=timer.phases[scored_by], eval_strict_s=strict,
               legality=legality, timings={k: round(v, 2) for k, v in timer.phases.items()})
    return out


def score_artifact(path: str, h: Hyperparameters, d: Dist, spec: DataSpec, val: ValData, backend: str,
                   log, timer: Timer) -> dict:
    """The strict eval of training and EVAL_ONLY runs alike: count the artifact's bytes, then from
    the load (EVAL_BUDGET_SECONDS runs from here) to the last score."""
    acc = artifact_accounting(path, h, log)
    timer.restart(h.eval_budget_seconds)
    with timer.phase("load"):
        model = load_artifact(path, h, d, spec.bos_id, backend)
    log(f"load: {path} in {timer.phases['load']:.1f}s")
    return {**acc, **final_evaluation(model, val, h, d, log, timer)}


def final_record(h: Hyperparameters, d: Dist, spec: DataSpec, val: ValData, config_hash: str, log,
                 **parts) -> dict:
    """The final_json of any run: what ran where on which data (tools read these keys), the run's
    `parts`, and whether it can back a record."""
    mode = "eval_only" if h.eval_only else "smoke" if h.smoke else "train"
    gpu = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    data = dict(variant=spec.variant, train_shards=len(spec.train_files), val_targets=val.num_targets,
                manifest_sha256=spec.manifest_sha256, identity=spec.identity)
    final = dict(run_id=h.run_id, seed=h.seed, mode=mode, env_overrides=h.env_overrides,
                 config_hash=config_hash, source_sha256=source_sha256(), world_size=d.world_size, gpu=gpu,
                 torch_version=torch.__version__, data=data, **parts)
    why = record_blockers(final, h)
    final.update(record_eligible=not why, not_record_because=why)
    log("record_eligible: " + (f"no ({'; '.join(why)})" if why else "yes"))
    log("final_json " + json.dumps(final))
    return final


def train_and_score(h: Hyperparameters, spec, d: Dist, log, timer: Timer, val: ValData, backend: str) -> dict:
    model = GPT(h, spec.bos_id, backend).to(d.device)
    log(f"model_params: {sum(p.numel() for p in model.parameters())}")
    if d.device.type == "cuda":
        compile_model(model)
    with timer.phase("compile_warmup"):
        compile_warmup(model, h, d, h.slot_tokens)
    with timer.phase("compile_eval"):
        if d.device.type == "cuda":
            precompile_eval(model, h, d, spec.bos_id)
    log(f"compile_warmup: train {timer.phases['compile_warmup']:.1f}s, eval "
        f"{timer.phases['compile_eval']:.1f}s (synthetic tokens, before the training clock)")
    graphs = [compiled_graphs()]
    stats = train(model, h, d, spec, val, log, timer)
    graphs.append(compiled_graphs())
    if d.device.type == "cuda":
        throughput_check(stats, h, d.world_size, torch.cuda.get_device_name(d.device), log)
    if h.prequant_ttt_epochs:  # ILLEGAL research mode (C3): stamped in final_json
        with timer.phase("prequant_ttt"):
            prequant_ttt(model, val, h, d, log)
    stats["peak_mem_mib"] = (torch.cuda.max_memory_allocated(d.device) // 2**20
                             if d.device.type == "cuda" else None)
    path, qstats = quantize_stage(model, spec, h, d, log, timer, stats)
    prequant, _ = evaluate("eval_prequant", eval_val, model, val, h, d, log, timer)
    log(f"pre-quant val_bpb: raw weights {stats['val_bpb_raw']:.6f}, EMA {prequant.bpb:.6f}")
    del model
    scored = score_artifact(path, h, d, spec, val, backend, log, timer)
    scored.update(val_bpb_quant=scored["val_bpb_diagnostic"],
                  compiled_graphs=log_graphs(graphs + [compiled_graphs()], log))
    if scored["artifact_bytes"] > ARTIFACT_CAP:
        scored["legality"] = f"artifact {scored['artifact_bytes']} B over the {ARTIFACT_CAP} B cap"
    return final_record(h, d, spec, val, h.config_hash(spec.identity), log, val_bpb_prequant=prequant.bpb,
                        **stats, **qstats, **scored)


def eval_only(h: Hyperparameters, meta: dict, overrides: dict, spec, d: Dist, val: ValData, backend: str,
              log, timer: Timer) -> dict:
    """EVAL_ONLY=path: no training; build the model the artifact describes, load it and score it.
    Its config hash is the artifact's, or, with eval fields overridden, a hash of both."""
    log(f"eval_only: {h.eval_only} from run {meta['run_id']} config_hash {meta['config_hash']} "
        f"source_sha256 {meta['source_sha256'][:16]} data {meta['data']}")
    for name, (theirs, used) in overrides.items():
        log(f"eval_only: override {name}={used} (artifact: {theirs})")
    changed = {k: v[1] for k, v in overrides.items() if k.lower() not in NOT_HASHED}
    config_hash = meta["config_hash"] if not changed else hashlib.sha256(
        json.dumps([meta["config_hash"], changed], sort_keys=True).encode()).hexdigest()[:16]
    scored = score_artifact(h.eval_only, h, d, spec, val, backend, log, timer)
    return final_record(h, d, spec, val, config_hash, log, artifact=h.eval_only,
                        artifact_config_hash=meta["config_hash"], artifact_run_id=meta["run_id"],
                        eval_overrides={k: v[1] for k, v in overrides.items()}, **scored)


def eval_only_config(h: Hyperparameters) -> tuple:
    """EVAL_ONLY: the configuration the artifact carries, before any data check or GPU work."""
    if not os.path.isfile(h.eval_only):
        raise ValueError(f"EVAL_ONLY={h.eval_only}: file not found")
    with open(h.eval_only, "rb") as f:
        meta = read_meta(f.read())
    return (meta, *artifact_config(h, meta))


def main():
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(__doc__ + "\n" + config_help())
        return
    h, meta, overrides = load_config(), {}, {}
    if h.eval_only:
        meta, h, overrides = eval_only_config(h)
    spec, d, log, timer, val, backend = setup(h)
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    if h.eval_only:  # no training; score a saved artifact (mode "eval_only")
        final = eval_only(h, meta, overrides, spec, d, val, backend, log, timer)
    else:
        final = train_and_score(h, spec, d, log, timer, val, backend)
    if dist.is_initialized():
        dist.destroy_process_group()
    if not h.eval_only and final["artifact_bytes"] > ARTIFACT_CAP:
        sys.exit(f"FAILED: {final['legality']}")


if __name__ == "__main__":
    main()
