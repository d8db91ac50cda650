"""bench/proxy.py: the later variants start only once the first has logged a training step."""
import subprocess
import sys
import time

from bench import proxy

WRITER = """
import sys, time
log = open(sys.argv[1], "w")
log.write("    log(f'{step}/{h.iterations} train_loss: ...')\\n")  # the log's source dump
log.flush()
time.sleep(float(sys.argv[2]))
log.write("1/200 train_loss: 9.0114 train_time: 0.01m\\n")
log.flush()
time.sleep(60)
"""


def test_wait_first_step_ignores_the_source_dump(tmp_path):
    log = str(tmp_path / "run.txt")
    p = subprocess.Popen([sys.executable, "-c", WRITER, log, "1.5"])
    try:
        t0 = time.time()
        proxy.wait_first_step(log, p, poll=0.1)
        assert p.poll() is None and time.time() - t0 >= 1.4  # not fooled by the indented line
        assert "1/200 train_loss" in open(log).read()
    finally:
        p.kill()


def test_wait_first_step_returns_when_the_run_dies(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proxy.wait_first_step(str(tmp_path / "never.txt"), p, poll=0.1)
    assert p.returncode == 3


def test_seed_table_means_deltas_welch_and_paired():
    rows = [(f"{v}_s{s}", 0, {"val_bpb_diagnostic": x}) for v, xs in
            (("base", (1.600, 1.602, 1.604)), ("lever", (1.590, 1.591, 1.592)),
             ("small", (1.5990, 1.6011, 1.6029))) for s, x in zip((1, 2, 3), xs)]
    table = proxy.seed_table(rows + [("late_s1", 1, {})], ["base", "lever", "small", "late"],
                             [1, 2, 3]).splitlines()
    base, lever, small, late = table[1].split(), table[2].split(), table[3].split(), table[4]
    assert base[1:3] == ["3", "1.60200"] and lever[2] == "1.59100" and lever[4] == "-0.01100"
    assert float(lever[5]) < 0.01 and float(lever[6]) < 0.01  # ten standard errors lower
    assert float(small[5]) > 0.2 and float(small[6]) < 0.01  # -0.001 at every seed: only pairing sees it
    assert "no finished run" in late
