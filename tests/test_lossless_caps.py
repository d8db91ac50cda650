"""CaseOps and casefold transforms, and the per-piece original-byte counters."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossless_caps import (ALLCAPS, CAPNEXT, ESC, TITLE, casefold, casefold_piece_bytes, caseops_decode,
                           caseops_encode, caseops_piece_bytes)

T, A, C = TITLE, ALLCAPS, CAPNEXT


@pytest.mark.parametrize("text, encoded", [
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),  # spec 2.4 / record README examples
    ("iPhone OpenAI", f"i{C}phone {T}open{C}a{C}i"),
    ("I", f"{T}i"),
    ("A", f"{T}a"),
    ("NASA", f"{A}nasa"),
    ("lower", "lower"),
    ("", ""),
    ("Ünïcode ÀBC", f"Ünïcode À{A}bc"),  # non-ASCII letters pass through and split ASCII runs
    ("x\ue001y", f"x{ESC}\ue001y"),  # a literal control char is escaped
    ("\ue004", f"{ESC}\ue004"),
    ("ABc aBC", f"{T}a{C}bc a{C}b{C}c"),
    ("McDonald's x86_64 HTTPServer", f"{T}mc{C}donald's x86_64 {T}h{C}t{C}t{C}p{C}server"),
])
def test_encode_examples_round_trip(text, encoded):
    assert caseops_encode(text) == encoded
    assert caseops_decode(encoded) == text


@pytest.mark.parametrize("bad", [
    T,  # dangling marker at the end
    C,
    ESC,
    f"{T}1",  # marker before a non-letter
    f"{A} ",
    f"a{T}b",  # TITLE inside a word
    f"{T}{A}a",  # two word modes
    f"{C}{C}a",  # two CAPNEXT in a row
    f"{T}{ESC}\ue001",  # ESC while a marker is pending
    f"ab{C}",
])
def test_decoder_rejects_malformed(bad):
    with pytest.raises(ValueError):
        caseops_decode(bad)


TEXT = st.text(alphabet=st.sampled_from(list("aAbBzZqQ \n\t.,1_'") + ["\ue001", "\ue002", "\ue003", "\ue004",
                                                                          "É", "é", "ß", "ﬁ", "漢", "😀", "\x00"]))


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_round_trip_random(text):
    enc = caseops_encode(text)
    assert caseops_decode(enc) == text
    assert caseops_encode(caseops_decode(enc)) == enc


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.integers(0, 10_000), max_size=12))
def test_piece_bytes_any_split_sums_to_utf8_length(text, cuts):
    """However the encoded text is cut into surfaces, the counts add up to the original bytes."""
    enc = caseops_encode(text)
    cuts = sorted({c % (len(enc) + 1) for c in cuts} | {0, len(enc)})
    surfaces = [enc[a:b] for a, b in zip(cuts, cuts[1:])]
    assert sum(caseops_piece_bytes(surfaces)) == len(text.encode("utf-8"))


def test_piece_bytes_spec_worked_example():
    """Spec 2.3: the surfaces of the real CaseOps tokenizer's pieces and their sidecar entries."""
    surfaces = [T, "the", " ", A, "nas", "a", " ", T, "la", "unch", " i", C, "phone", " ", T, "open", C, "a",
                C, "i", "  double", "  space", "\nnew", "line"]
    assert caseops_piece_bytes(surfaces) == [0, 3, 1, 0, 3, 1, 1, 0, 2, 4, 2, 0, 5, 1, 0, 4, 0, 1, 0, 1, 8, 7, 4, 4]


def test_piece_bytes_byte_fallback_and_escape():
    assert caseops_piece_bytes(["", "Ü"]) == [0, 2]  # the piece completing the char carries it
    assert caseops_piece_bytes(["", "", "", "😀"]) == [0, 0, 0, 4]
    assert caseops_piece_bytes([ESC, "\ue001"]) == [0, 3]  # an escaped literal counts its 3 bytes
    with pytest.raises(ValueError):
        caseops_piece_bytes([T, " "])


def test_casefold_definition():
    assert casefold("The NASA ﬁle ÀÉ İ ½") == "the nasa file àé i̇ 1⁄2"
    assert casefold("ASCII Only") == "ascii only"
    assert casefold("ΟΔΟΣ") == "οδοσ"  # per code point: no contextual final sigma


def test_casefold_piece_bytes():
    src = "Aﬁ½ É"
    f = casefold(src)  # "afi1⁄2 é"
    assert f == "afi1⁄2 é"
    # tokens: "a", "f", "i1", "⁄2", " é": ﬁ (3 bytes) goes to the token completing "fi"
    spans = [(0, 1), (1, 2), (2, 4), (4, 6), (6, 8)]
    assert casefold_piece_bytes(src, spans) == [1, 0, 3 + 0, 2, 1 + 2]
    assert casefold_piece_bytes("abc", [(0, 2), (2, 3)]) == [2, 1]


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.integers(0, 10_000), max_size=10))
def test_casefold_bytes_partition_sums_to_utf8_length(text, cuts):
    f = casefold(text)
    cuts = sorted({c % (len(f) + 1) for c in cuts} | {0, len(f)})
    assert sum(casefold_piece_bytes(text, list(zip(cuts, cuts[1:])))) == len(text.encode("utf-8"))
