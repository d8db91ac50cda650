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
