"""Byte accounting: the scorer's piece-table LUT (train_gpt) and our sidecar counter (data.common)."""

import os

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from conftest import CASEOPS8192, SP8192, need
from data import common


@pytest.fixture(scope="module")
def sp_lut(smoke_dir):
    path = SP8192 if os.path.isfile(SP8192) else os.path.join(smoke_dir, "smoke_caseops_1024.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    return sp, train_gpt.build_byte_lut(sp, sp.get_piece_size())


def lut_bytes(lut, tokens):
    return train_gpt.lut_target_bytes(np.array(tokens, dtype=np.uint16), lut).tolist()


def test_lut_leading_space_not_counted_after_bos(sp_lut):
    sp, lut = sp_lut
    word = next(i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("\u2581")
                and len(sp.id_to_piece(i)) > 2 and not sp.is_byte(i))
    n = len(sp.id_to_piece(word)[1:].encode("utf-8"))
    other = sp.piece_to_id("a")
    assert lut_bytes(lut, [1, word]) == [n]  # after BOS the document's leading space is gone
    assert lut_bytes(lut, [1, other, word]) == [1, n + 1]  # elsewhere `▁` is one space byte
    space = sp.piece_to_id("\u2581")
    assert space != sp.unk_id()
    assert lut_bytes(lut, [1, space, other, space]) == [0, 1, 1]


def test_lut_byte_fallback_pieces_are_one_byte_each(sp_lut):
    sp, lut = sp_lut
    ids = sp.encode("\U0001F9EA")  # test-tube emoji: not in any of these vocabularies
    assert len(ids) == 4 and all(sp.is_byte(i) for i in ids)
    assert lut_bytes(lut, [1] + ids) == [1, 1, 1, 1]  # never 3 (the length of U+FFFD)


def test_lut_doc_counts_normalized_bytes(sp_lut):
    sp, lut = sp_lut
    text = "Hello  world\n\ttab ﬁ ½ \U0001F9EA end"
    ids = sp.encode(text)
    norm = common.sentencepiece_normalized(sp, text)
    assert sum(lut_bytes(lut, [1] + ids)) == len(norm.encode("utf-8"))
    assert sp.decode(ids) == norm


def test_sidecar_strips_only_edge_whitespace(caseops_model):
    enc = common.DocEncoder(caseops_model, "caseops")
    text = " \n Hello  World,\tNASA  iPhone \n\n"
    ids, counts = enc.token_bytes(text)
    assert ids == enc.sp.encode(common.transform_text("caseops", text))
    assert sum(counts) == len(text.strip().encode("utf-8"))  # interior runs count in full
    for text in ["", "   ", "\ue001 literal", "Ünïcode ÀÉ \U0001F9EA"]:
        assert sum(enc.token_bytes(text)[1]) == len(text.strip().encode("utf-8"))


def test_sidecar_spec_worked_example():
    """Spec 2.3, with the challenge's CaseOps tokenizer."""
    enc = common.DocEncoder(need(CASEOPS8192), "caseops")
    ids, counts = enc.token_bytes("The NASA Launch iPhone OpenAI  double  space\nnewline")
    assert counts == [0, 3, 1, 0, 3, 1, 1, 0, 2, 4, 2, 0, 5, 1, 0, 4, 0, 1, 0, 1, 8, 7, 4, 4]
    assert sum(counts) == 52
    lut = train_gpt.build_byte_lut(enc.sp, enc.sp.get_piece_size())
    assert sum(lut_bytes(lut, [1] + ids)) == 71  # what the LUT would wrongly give
    assert enc.token_bytes("Ü")[1] == [0, 2]  # byte fallback: the completing piece carries the char


def test_sidecar_casefold_counts_original_bytes(caseops_model):
    enc = common.DocEncoder(caseops_model, "casefold")  # any SentencePiece model will do here
    text = "  ÀÉ ﬁle ½ İstanbul STRASSE \U0001F9EA "
    ids, counts = enc.token_bytes(text)
    assert ids == enc.sp.encode(common.transform_text("casefold", text))
    assert sum(counts) == len(text.strip().encode("utf-8"))


def test_proto_parser_matches_sentencepiece(caseops_model):
    sp = spm.SentencePieceProcessor(model_file=caseops_model)
    text = "Ünïcode \ue004\ue001 ﬁ ½  x\x01y \U0001F9EA"
    ids, begins, ends = common.parse_sp_proto(sp.encode(text, out_type="serialized_proto"))
    assert ids == sp.encode(text)
    raw = text.encode("utf-8")
    assert b"".join(raw[b:e] for b, e in zip(begins, ends)) == raw[begins[0]:ends[-1]]
