#!/usr/bin/env python3
"""Pack a readable training script into a small, deterministic, self-extracting loader.

The packed file is what gets shipped and counted (code bytes = its size). It holds the
readable source as lzma(raw, preset 9e), written as the characters of a Latin-1 string
literal (only backslash, quote, CR, LF and NUL escaped: ~2.5 % over the compressed size,
where base85 costs 25 %; the file declares `coding: latin-1`), checks the embedded sha256, registers
the text in `linecache` under the original file name (so tracebacks, `inspect.getsource`
and torch.compile see real names and line numbers), and execs it as `__main__` with
`__file__` = the packed file and `__source__` = the source text.

    python tools/pack.py train_gpt.py -o out/train_gpt.py          # write
    python tools/pack.py train_gpt.py -o out/train_gpt.py --check  # verify, exit 1 on mismatch

Stdlib only.
"""
import argparse
import ast
import hashlib
import lzma
import os
import re
import sys

# Fixed filter chain: output depends only on the input bytes (and the liblzma version).
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

# The loader is kept tiny because every byte of it is counted against the 16 MB cap.
# Why each step:
# - module object registered as sys.modules[__name__]: classes defined by the source get a
#   real __main__ to resolve against (pickle, dataclasses, multiprocessing).
# - sys.excepthook = traceback.print_exception: CPython <= 3.12's default hook reads source
#   lines from disk, not from linecache, so it would show the packed file's lines.
LOADER = """\
# -*- coding: latin-1 -*-
import hashlib,linecache,lzma,os,sys,traceback,types
N={name!r};H={sha!r}
S=lzma.decompress("{payload}".encode("latin-1"),lzma.FORMAT_RAW,filters=[{{"id":lzma.FILTER_LZMA2,"preset":9|lzma.PRESET_EXTREME}}]).decode()
if hashlib.sha256(S.encode()).hexdigest()!=H:sys.exit(__file__+": embedded source sha256 mismatch; re-run tools/pack.py")
linecache.cache[N]=(len(S),None,S.splitlines(True),N);sys.excepthook=traceback.print_exception
m=types.ModuleType(__name__);m.__dict__.update(__file__=os.path.abspath(__file__),__source__=S,__builtins__=__builtins__)
sys.modules[__name__]=m;exec(compile(S,N,"exec"),m.__dict__)
"""

# Matches the fields written by LOADER; used by --check and by tools/package.py.
_FIELDS = re.compile(r'N=(?P<name>\'[^\']*\'|"[^"]*");H=\'(?P<sha>[0-9a-f]{64})\'\n'
                     r'S=lzma\.decompress\("(?P<payload>(?:[^"\\]|\\.)*)"\.encode')
# The bytes a Python string literal cannot hold as themselves (NUL: no NUL in source files).
_ESCAPES = {0: "\\x00", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}


def literal_chars(data):
    """Bytes -> the inside of a string literal in a Latin-1 source file that evaluates to them."""
    return "".join(_ESCAPES.get(b, chr(b)) for b in data)


class PackError(Exception):
    """A packing or verification problem; the message names the file to fix."""


def read_source(path):
    """Return the source bytes, refusing files the loader could not round-trip."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PackError(f"{path}: not valid UTF-8 ({e}); save the source as UTF-8") from None
    if text.startswith("\ufeff"):
        raise PackError(f"{path}: starts with a UTF-8 BOM; remove it so sha256 and compile agree")
    return data


def pack_bytes(source, name):
    """Build the loader text (as bytes) for `source` bytes, compiled under file name `name`."""
    if "'" in name or "\n" in name:
        raise PackError(f"file name {name!r} must not contain quotes or newlines")
    compressed = lzma.compress(source, format=lzma.FORMAT_RAW, filters=FILTERS)
    sha = hashlib.sha256(source).hexdigest()
    return LOADER.format(name=name, sha=sha, payload=literal_chars(compressed)).encode("latin-1")


def unpack_bytes(packed, where="packed file"):
    """Return (name, sha256, source bytes) embedded in a packed loader; verify the hash."""
    m = _FIELDS.search(packed.decode("latin-1"))
    if not m:
        raise PackError(f"{where}: not a file written by tools/pack.py")
    compressed = ast.literal_eval('"' + m["payload"] + '"').encode("latin-1")
    source = lzma.decompress(compressed, format=lzma.FORMAT_RAW, filters=FILTERS)
    if hashlib.sha256(source).hexdigest() != m["sha"]:
        raise PackError(f"{where}: embedded sha256 does not match the embedded source")
    return m["name"][1:-1], m["sha"], source


def check(source_path, packed_path, name):
    """Return a list of problems (empty if `packed_path` is exactly pack(source))."""
    source = read_source(source_path)
    try:
        with open(packed_path, "rb") as f:
            packed = f.read()
    except FileNotFoundError:
        return [f"{packed_path}: does not exist; run tools/pack.py {source_path} -o {packed_path}"]
    if packed == pack_bytes(source, name):
        return []
    try:
        got_name, _, got_source = unpack_bytes(packed, packed_path)
    except PackError as e:
        return [str(e)]
    problems = []
    if got_source != source:
        problems.append(f"{packed_path}: embedded source differs from {source_path}; re-pack")
    if got_name != name:
        problems.append(f"{packed_path}: compiled as {got_name!r}, expected {name!r}")
    # Another liblzma build may compress differently; that is fine if the loader is unchanged.
    if not problems and _without_payload(packed) != _without_payload(pack_bytes(source, name)):
        problems.append(f"{packed_path}: loader code differs from what tools/pack.py writes; re-pack")
    return problems


def _without_payload(packed):
    return _FIELDS.sub(lambda m: m[0].replace(m["payload"], ""), packed.decode("latin-1"))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pack a readable script into a self-extracting loader.")
    ap.add_argument("source", help="readable source, e.g. train_gpt.py")
    ap.add_argument("-o", "--out", required=True, help="packed output path (the counted file)")
    ap.add_argument("--name", help="file name used in tracebacks (default: basename of source)")
    ap.add_argument("--check", action="store_true", help="verify OUT instead of writing it")
    args = ap.parse_args(argv)
    name = args.name or os.path.basename(args.source)
    try:
        source = read_source(args.source)
        if args.check:
            problems = check(args.source, args.out, name)
            for p in problems:
                print(f"pack --check: {p}", file=sys.stderr)
            if problems:
                return 1
            packed_size = os.path.getsize(args.out)
        else:
            packed = pack_bytes(source, name)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "wb") as f:
                f.write(packed)
            packed_size = len(packed)
    except (PackError, OSError) as e:
        print(f"pack: {e}", file=sys.stderr)
        return 2
    print(f"source_bytes: {len(source)}")
    print(f"packed_bytes: {packed_size}")
    print(f"source_sha256: {hashlib.sha256(source).hexdigest()}")
    if args.check:
        print(f"check: OK ({args.out} matches {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
