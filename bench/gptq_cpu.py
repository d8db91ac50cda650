"""GPTQ wall time of one MLP-sized matrix (2048 x 512, int6) on the CPU, on trained-like weights
and correlated inputs (the generators of tests/test_quant.py). Moved out of the test suite: it
times, it does not test.

    python bench/gptq_cpu.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_quant import correlated_inputs, hessian, trained_like  # noqa: E402
from train_gpt import gptq_quantize  # noqa: E402


def main():
    W = trained_like(2048, 512)
    H = hessian(correlated_inputs(4096, 512))
    t0 = time.perf_counter()
    gptq_quantize(W, H, 6, 11.5)
    print(f"GPTQ 2048x512 int6 on CPU ({torch.get_num_threads()} threads): {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
