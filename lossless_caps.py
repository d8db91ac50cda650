"""Text transforms applied before SentencePiece, and the original-byte count of each token.

Only what the data pipeline uses (standard library only):

* CaseOps (`lossless_caps_caseops_v1`): a bijective case transform. Runs of ASCII letters are
  lowercased and their case is written as private-use marker characters; everything else passes
  through. `caseops_decode(caseops_encode(x)) == x` for every string x.
* Casefold (`casefold_v1`): the lossy lowercase variant (PR #1578/#1670/#1693 lineage).

Byte accounting: BPB divides by the UTF-8 bytes of the *original* document, so each token is
credited with the original bytes it stands for (`caseops_piece_bytes`, `casefold_piece_bytes`).
"""

import bisect
import itertools
import re
import unicodedata

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = TITLE + ALLCAPS + CAPNEXT + ESC

_ENCODE_RE = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")
_DECODE_RE = re.compile(r"[\ue001-\ue004]|[A-Za-z]+|[^A-Za-z\ue001-\ue004]+")
_NEEDS_ENCODING_RE = re.compile(r"[A-Z\ue001-\ue004]")


def _encode_match(m: re.Match) -> str:
    w = m.group()
    if w in CONTROLS:  # a literal control character is escaped
        return ESC + w
    if w.islower():
        return w
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    if len(w) >= 2 and w[0].isupper() and w[1:].islower():
        return TITLE + w.lower()
    out = [TITLE + w[0].lower() if w[0].isupper() else w[0]]
    out += [CAPNEXT + c.lower() if c.isupper() else c for c in w[1:]]
    return "".join(out)


def caseops_encode(text: str) -> str:
    """Rewrite the case of every maximal run of ASCII letters as markers (spec 2.4).

    all lowercase: unchanged; >= 2 letters all upper: ALLCAPS + lower; Upper then lower: TITLE +
    lower; anything else (including single capitals like "I"): TITLE before an uppercase first
    letter, CAPNEXT before each later uppercase letter. A literal U+E001..U+E004 becomes ESC + it.
    """
    if not _NEEDS_ENCODING_RE.search(text):
        return text
    return _ENCODE_RE.sub(_encode_match, text)


class CaseOpsDecoder:
    """The CaseOps decoder as a state machine that can be fed text in pieces.

    `feed` returns the decoded text of the piece; its UTF-8 length is the number of original
    bytes the piece accounts for (markers decode to nothing, a letter to one byte whatever its
    case, an escaped literal control to its own 3 bytes). Malformed input raises ValueError.
    """

    def __init__(self):
        self.escape = False  # the previous char was ESC
        self.mode = None  # None | TITLE | ALLCAPS: applies to the next word's first letter
        self.capnext = False  # uppercase the next letter
        self.allcaps = False  # inside an ALLCAPS word
        self.in_word = False  # inside a run of ASCII letters

    def feed(self, text: str) -> str:
        out = []
        for m in _DECODE_RE.finditer(text):
            s = m.group()
            if self.escape:  # the char after ESC is literal, whatever it is
                self.escape = False
                c, s = s[0], s[1:]
                out.append(c)
                self.in_word = c.isascii() and c.isalpha()
                self.allcaps = self.allcaps and self.in_word
                if not s:
                    continue
            if s == ESC:
                if self.mode or self.capnext:
                    raise ValueError("caseops: ESC while a case marker is pending")
                self.escape = True
            elif s in (TITLE, ALLCAPS):
                if self.in_word or self.mode or self.capnext:
                    raise ValueError("caseops: TITLE/ALLCAPS inside a word or after another marker")
                self.mode = s
            elif s == CAPNEXT:
                if self.capnext:
                    raise ValueError("caseops: two CAPNEXT in a row")
                self.capnext = True
            elif s[0].isascii() and s[0].isalpha():
                first, rest = s[0], s[1:]
                if not self.in_word:
                    upper = self.mode is not None or self.capnext
                    self.allcaps, self.in_word = self.mode == ALLCAPS, True
                else:
                    upper = self.allcaps or self.capnext
                out.append(first.upper() if upper else first)
                out.append(rest.upper() if self.allcaps else rest)
                self.mode, self.capnext = None, False
            else:  # a run of non-letters ends the word
                if self.mode or self.capnext:
                    raise ValueError(f"caseops: case marker before non-letter {s[0]!r}")
                self.in_word = self.allcaps = False
                out.append(s)
        return "".join(out)

    def finish(self) -> None:
        if self.escape or self.mode or self.capnext:
            raise ValueError("caseops: dangling marker at end of text")


def caseops_decode(text: str) -> str:
    """Inverse of caseops_encode; raises ValueError on a malformed stream."""
    d = CaseOpsDecoder()
    out = d.feed(text)
    d.finish()
    return out


def caseops_piece_bytes(surfaces) -> list:
    """Original UTF-8 bytes of each piece of one document, from the pieces' surfaces.

    The surfaces are the substrings of the transformed input each SentencePiece piece covers, in
    order. They are walked through the decoder: 0 for markers (and BOS, whose surface is empty),
    1 per ASCII letter, the UTF-8 length of any other char, 3 for an ESC-escaped literal control.
    Byte-fallback pieces that start a multi-byte char have an empty surface and get 0; the piece
    completing the char carries all its bytes. Raises ValueError if the stream is malformed.
    """
    d = CaseOpsDecoder()
    out = [len(d.feed(s).encode("utf-8")) for s in surfaces]
    d.finish()
    return out


# Casefold ---------------------------------------------------------------------------------------

_FOLD_CACHE = {}


def _fold_char(c: str) -> str:
    f = _FOLD_CACHE.get(c)
    if f is None:
        f = _FOLD_CACHE[c] = unicodedata.normalize("NFKC", c).lower()
    return f


def casefold(text: str) -> str:
    """Lossy lowercase transform `casefold_v1`: NFKC of each code point, then str.lower() of it.

    casefold(text) == "".join(NFKC(c).lower() for c in text). Working per code point (not
    NFKC(text).lower()) gives every output char exactly one source char, which the byte rule
    below needs; the two differ only on composing sequences (e.g. "E" + U+0301) and on Greek final
    sigma, and SentencePiece's own nmt_nfkc pass recomposes the former anyway. ASCII text is just
    lowercased. Case cannot be recovered, so BPB on this variant is not comparable with the
    lossless ones; it is kept for ablations (spec 2.5).
    """
    if text.isascii():
        return text.lower()
    return "".join(map(_fold_char, text))


def casefold_piece_bytes(source: str, spans) -> list:
    """Original UTF-8 bytes of each token of casefold(source).

    spans: (start, end) char offsets of each token's surface in casefold(source). Source char i
    maps to casefold output chars [e_{i-1}, e_i); a token covering [s, e) is credited with the
    bytes of every source char whose image ends inside (s, e], i.e. the token that completes a
    char's image carries all of its bytes (the byte-fallback convention). Chars outside every span
    (whitespace SentencePiece strips at the doc edges) count 0.
    """
    if source.isascii():
        return [e - s for s, e in spans]
    ends = list(itertools.accumulate(len(_fold_char(c)) for c in source))
    cum = list(itertools.accumulate(len(c.encode("utf-8")) for c in source))

    def upto(p):
        k = bisect.bisect_right(ends, p)
        return cum[k - 1] if k else 0

    return [upto(e) - upto(s) for s, e in spans]
