"""How much of the val stream the n-gram tilt touches, and how often its hint is the realised
token, at a few NGRAM_ORDER / NGRAM_THRESHOLD settings (CPU, tokens only, no model):

    bench/tokenize_bench.sh /tmp/bench_caseops && python bench/tilt_hints.py
    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=... python bench/tilt_hints.py   # other data

With boost b and model probability p of the hint, a hit changes that target's NLL by
-b + log(1 + p (e^b - 1)) and a miss by log(1 + p (e^b - 1)): the tilt's effect needs the model's
p (tools/ab.py NGRAM_BOOST=...); this bounds it (hits x b nats at p -> 0)."""
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def main(environ) -> list:
    """One line per setting; DATA_PATH / TOKENIZER_PATH / VOCAB_SIZE from `environ` (default: the
    bench pack)."""
    data = environ.get("DATA_PATH", "/tmp/bench_caseops")
    tok = environ.get("TOKENIZER_PATH", f"{data}/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    h = tg.load_config({"DATA_PATH": data, "TOKENIZER_PATH": tok, "VOCAB_SIZE": environ.get("VOCAB_SIZE", "8192")})
    val = tg.load_val_data(tg.load_data_spec(h), h)
    starts, y = tg.find_docs(val.tokens, val.bos_id)[0], val.tokens[1:val.num_targets + 1].long()
    total, lines, t0 = int(val.target_bytes.sum()), [], time.time()
    for order, thr in ((16, 0.8), (8, 0.8), (12, 0.5), (16, 0.5)):
        h.ngram_order, h.ngram_threshold = order, thr
        hints = tg.ngram_hints(val, starts, h)
        m = hints >= 0
        hits = int((hints[m] == y[m]).sum())
        lines.append(f"order {order} thr {thr}: hinted {int(m.sum())} of {val.num_targets} targets, "
                     f"hits {hits} (precision {hits / max(int(m.sum()), 1):.4f}), hinted bytes "
                     f"{int(val.target_bytes[m].sum())} of {total}, ceiling at boost 2.625 "
                     f"{hits * 2.625 / (math.log(2) * total):.5f} bpb [{time.time() - t0:.0f}s]")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main(os.environ)
