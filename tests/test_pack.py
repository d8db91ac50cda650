import ast
import hashlib
import lzma
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pack

TOY = '''\
import inspect
import sys


def answer():
    """A function whose source inspect must find."""
    return 42


print("file=" + __file__)
print("name=" + __name__)
print("source_sha=" + __import__("hashlib").sha256(__source__.encode()).hexdigest())
print("getsource=" + repr(inspect.getsource(answer)))
if "--help" in sys.argv:
    print("toy config: SEED=1")
    sys.exit(0)
if "--boom" in sys.argv:
    raise ValueError("deliberate failure")
'''
BOOM_LINE = TOY.splitlines().index('    raise ValueError("deliberate failure")') + 1


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def toy(tmp_path):
    src = tmp_path / "src" / "toy_train.py"
    src.parent.mkdir()
    src.write_text(TOY)
    return src


def test_deterministic(toy):
    data = toy.read_bytes()
    assert pack.pack_bytes(data, "toy_train.py") == pack.pack_bytes(data, "toy_train.py")


def test_cli_is_deterministic_and_reports_sizes(toy, tmp_path):
    outs = [tmp_path / "a.py", tmp_path / "b.py"]
    for out in outs:
        r = run([pack.__file__, str(toy), "-o", str(out)], tmp_path)
        assert r.returncode == 0, r.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert f"source_bytes: {len(TOY)}" in r.stdout
    assert f"packed_bytes: {outs[0].stat().st_size}" in r.stdout
    assert hashlib.sha256(TOY.encode()).hexdigest() in r.stdout


def test_round_trip_exact_source(toy):
    data = toy.read_bytes()
    name, sha, source = pack.unpack_bytes(pack.pack_bytes(data, "toy_train.py"))
    assert name == "toy_train.py"
    assert source == data
    assert sha == hashlib.sha256(data).hexdigest()


def test_packed_script_runs_with_honest_globals(toy, tmp_path):
    out = tmp_path / "rec" / "train_gpt.py"
    assert run([pack.__file__, str(toy), "-o", str(out)], tmp_path).returncode == 0
    r = run(["train_gpt.py", "--help"], out.parent)
    assert r.returncode == 0, r.stderr
    assert f"file={out}" in r.stdout
    assert "name=__main__" in r.stdout
    assert "source_sha=" + hashlib.sha256(TOY.encode()).hexdigest() in r.stdout
    assert "return 42" in r.stdout  # inspect.getsource found the real text
    assert "toy config: SEED=1" in r.stdout


def test_traceback_shows_original_name_and_line(toy, tmp_path):
    out = tmp_path / "rec" / "train_gpt.py"
    pack.main([str(toy), "-o", str(out)])
    r = run(["train_gpt.py", "--boom"], out.parent)
    assert r.returncode == 1
    assert f'File "toy_train.py", line {BOOM_LINE}, in <module>' in r.stderr
    assert 'raise ValueError("deliberate failure")' in r.stderr  # source line, not the loader's
    assert "ValueError: deliberate failure" in r.stderr


def test_check_accepts_match_and_rejects_other_source(toy, tmp_path, capsys):
    out = tmp_path / "packed.py"
    assert pack.main([str(toy), "-o", str(out)]) == 0
    assert pack.main([str(toy), "-o", str(out), "--check"]) == 0
    toy.write_text(TOY + "# edited\n")
    assert pack.main([str(toy), "-o", str(out), "--check"]) == 1
    assert "embedded source differs" in capsys.readouterr().err


def test_check_detects_edited_loader(toy, tmp_path):
    out = tmp_path / "packed.py"
    pack.main([str(toy), "-o", str(out)])
    out.write_bytes(out.read_bytes() + b"print('extra')\n")
    assert pack.check(str(toy), str(out), "toy_train.py")


def test_corrupted_payload_fails_loudly(toy, tmp_path):
    packed = pack.pack_bytes(toy.read_bytes(), "toy_train.py")
    sha = hashlib.sha256(toy.read_bytes()).hexdigest().encode()
    bad = tmp_path / "bad.py"
    bad.write_bytes(packed.replace(sha, b"0" * 64))
    r = run([str(bad)], tmp_path)
    assert r.returncode != 0
    assert "sha256 mismatch" in r.stderr


def test_large_source_packs_small(tmp_path):
    # A realistic-ish large script: many similar but distinct functions with comments.
    parts = [f'''
def block_{i}(x, scale={i % 7 + 1}):
    """Apply transform number {i} to x; kept readable on purpose."""
    # residual connection with a per-block scale
    y = x * scale + {i}
    return y if y > {i * 3} else -y
''' for i in range(1500)]
    src = ("import math\n" + "".join(parts)).encode()
    assert len(src) > 150_000
    packed = pack.pack_bytes(src, "big.py")
    assert len(packed) < len(src) / 5
    assert pack.unpack_bytes(packed)[2] == src


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_literal_chars_round_trip_any_bytes(data):
    """Every byte value survives the Latin-1 literal, and the packed text has no NUL or CR/LF
    inside the literal (Python would refuse or translate them)."""
    text = pack.literal_chars(data)
    assert not set(text) & {"\x00", "\n", "\r"}
    assert ast.literal_eval('"' + text + '"').encode("latin-1") == data


def test_rejects_non_utf8(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_bytes(b"x = '\xff'\n")
    assert pack.main([str(bad), "-o", str(tmp_path / "o.py")]) == 2


def test_check_tolerates_other_lzma_output(toy, tmp_path):
    # A different liblzma build may emit different (still valid) compressed bytes.
    data = toy.read_bytes()
    packed = pack.pack_bytes(data, "toy_train.py").decode("latin-1")
    m = pack._FIELDS.search(packed)
    other = pack.literal_chars(lzma.compress(data, format=lzma.FORMAT_RAW,
                                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}]))
    assert other != m["payload"]
    out = tmp_path / "packed.py"
    out.write_bytes(packed.replace(m["payload"], other).encode("latin-1"))
    assert pack.check(str(toy), str(out), "toy_train.py") == []
    assert run([str(out), "--help"], tmp_path).returncode == 0
