"""Shared fixtures. The challenge tokenizers come from ../shared/bench/tokenizers next to the
checkout (CI has it there); tests that need them skip cleanly when it is absent."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
BENCH_TOKENIZERS = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "bench", "tokenizers"))
SP8192 = os.path.join(BENCH_TOKENIZERS, "fineweb_8192_bpe.model")
CASEOPS8192 = os.path.join(BENCH_TOKENIZERS, "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")


def need(path):
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present (shared bench pack is not next to this checkout)")
    return path


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory):
    """The smoke dataset, built once per session into a temp dir."""
    from data import prepare

    out = str(tmp_path_factory.mktemp("smoke"))
    prepare.smoke(out=out, workers=2)
    return out


@pytest.fixture(scope="session")
def caseops_model(smoke_dir):
    """The real CaseOps tokenizer when present, else the smoke one."""
    if os.path.isfile(CASEOPS8192):
        return CASEOPS8192
    return os.path.join(smoke_dir, "smoke_caseops_1024.model")

# The tools are scripts (run as `python tools/x.py`), so tests import them as top-level modules.
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))


def free_port() -> int:
    """A free localhost port for a gloo process group (tests that spawn ranks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
