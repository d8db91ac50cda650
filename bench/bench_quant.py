"""Quantization ablation on a trained model (one GPU): the same float weights quantized several
ways, each scored with the non-overlapping eval of the dequantized model.

  SAVE_PREQUANT=1 ... bench/gpu_run.sh 1 RUN ...        # writes ARTIFACT_DIR/final_model.pt
  DATA_PATH=... TOKENIZER_PATH=... python bench/bench_quant.py /tmp/art_RUN/final_model.pt

Variants: the record setting (LQER on) and LQER off, at the env config (no fitting to the cap).
Prints val_bpb (float and each variant), the quantization gap, model bytes, GPTQ and serialize time.
"""
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def score(model, state, val, d, h) -> float:
    model.load_state_dict({k: v.to(d.device) for k, v in state.items()})
    return tg.eval_val(model, val, h, d, tg.ScoreLedger(val.num_targets, d.device), print).bpb


def main():
    h = tg.load_config()
    spec, d = tg.load_data_spec(h), tg.init_distributed(h)
    val = tg.load_val_data(spec, h)
    ck = torch.load(sys.argv[1], map_location="cpu")
    sd = {k: v.float() for k, v in ck.get("state_dict", ck).items()}  # SAVE_PREQUANT also saves the config
    model = tg.GPT(h, spec.bos_id, tg.pick_attention_backend(d.device)).to(d.device)
    model.looping = True  # a full-length run ends with the loop on
    base = score(model, sd, val, d, h)
    t0 = time.perf_counter()
    hess = tg.collect_hessians(model, spec, h, d)
    print(f"float val_bpb {base:.5f}; hessians {time.perf_counter() - t0:.1f}s", flush=True)
    for name, kw in [("record", {}), ("lqer_off", {"lqer_enabled": False})]:
        hv = copy.copy(h)
        for k, v in kw.items():
            setattr(hv, k, v)
        t0 = time.perf_counter()
        qstate = tg.quantize_state_dict(sd, hess, hv, log=lambda *a: None)
        t1 = time.perf_counter()
        blob = tg.serialize(qstate, hv)
        t2 = time.perf_counter()
        bpb = score(model, tg.dequantize_state_dict(tg.deserialize(blob)), val, d, h)
        lqer = [n for n, e in qstate.items() if "lqer_qa" in e]
        print(f"{name}: val_bpb {bpb:.5f} gap {bpb - base:+.5f} model_bytes {len(blob)} "
              f"gptq {t1 - t0:.1f}s serialize {t2 - t1:.1f}s lqer {lqer}", flush=True)


if __name__ == "__main__":
    main()
