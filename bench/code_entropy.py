"""How close brotli comes to the order-0 entropy of an artifact's quantized codes, per tensor type.

  python bench/code_entropy.py final_model.ptz

A ratio near 1.0 means no reordering of bytes can gain much; only context modelling could.
"""
import os
import sys

import brotli
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def entropy_bytes(codes: np.ndarray) -> float:
    p = np.bincount(codes - codes.min()) / codes.size
    p = p[p > 0]
    return -(p * np.log2(p)).sum() * codes.size / 8


def main():
    qstate = tg.deserialize(open(sys.argv[1], "rb").read())
    groups = {}
    for name, e in qstate.items():
        if "q" in e:
            groups.setdefault(tg.weight_type(name), []).append(e["q"])
    for kind, qs in groups.items():
        packed = len(brotli.compress(b"".join(tg.stored_bytes("q", q) for q in qs), quality=11, lgwin=24))
        h0 = entropy_bytes(torch.cat([q.flatten() for q in qs]).numpy().astype(np.int64))
        print(f"{kind:28s} brotli {packed:>10,} B  order-0 entropy {h0:>12,.0f} B  ratio {packed / h0:.3f}")


if __name__ == "__main__":
    main()
