"""Shared pieces of the data pipeline: documents in, shards out, and the byte accounting.

The scorer is train_gpt.py; this module imports it (shard reader, byte LUT, manifest checks)
rather than re-implementing it, so the proof in prepare.py `verify` exercises the scoring code.
The train/val disjointness check lives here: it is data preparation, not scoring.
"""

import hashlib
import io
import json
import lzma
import os
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import lossless_caps  # noqa: E402
import train_gpt  # noqa: E402

DataError = train_gpt.DataError
BOS_ID = 1
CANONICAL_VAL_DOCS = 50_000  # the challenge's val split: the first 50,000 docs of the stream
SHARD_TOKENS = 10**8
UINT16_MAX = 2**16 - 1
# variant -> (text_transform, byte_source), as written into manifest.json
VARIANTS = {
    "sp": ("none", "lut"),
    "caseops": ("lossless_caps_caseops_v1", "sidecar"),
    "casefold": ("casefold_v1", "sidecar"),
}


def transform_text(variant: str, text: str) -> str:
    if variant == "caseops":
        return lossless_caps.caseops_encode(text)
    if variant == "casefold":
        return lossless_caps.casefold(text)
    return text


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """One stderr line every few seconds on long work."""

    def __init__(self, what: str, every: float = 5.0):
        self.what, self.every, self.t0 = what, every, time.time()
        self.last = self.t0

    def __call__(self, docs: int, tokens: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= self.every:
            self.last, dt = now, max(now - self.t0, 1e-9)
            log(f"{self.what}: {docs:,} docs, {tokens:,} tokens, {dt:.0f}s ({tokens / dt:,.0f} tok/s)")


# Documents ------------------------------------------------------------------------------------


def open_binary(path: str):
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def iter_doc_lines(paths):
    """Raw JSON lines of every document, files in the given order (blank lines skipped)."""
    for path in paths:
        with open_binary(path) as f:
            for line in f:
                if line.strip():
                    yield line


def doc_text(line) -> str:
    text = json.loads(line)["text"]
    if not isinstance(text, str):
        raise DataError(f"document 'text' is {type(text).__name__}, not a string")
    return text


def iter_docs(paths, limit=None):
    for i, line in enumerate(iter_doc_lines(paths)):
        if limit is not None and i >= limit:
            return
        yield doc_text(line)


# Shards ---------------------------------------------------------------------------------------


def write_shard(path: str, values: np.ndarray) -> dict:
    """Write one shard (header + uint16 payload) atomically; return its manifest entry."""
    values = np.ascontiguousarray(values, dtype="<u2")
    header = np.zeros(train_gpt.HEADER_INTS, dtype="<i4")
    header[:3] = (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, values.size)
    blob_h, blob_v = header.tobytes(), values.tobytes()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob_h)
        f.write(blob_v)
    os.replace(tmp, path)
    sha = hashlib.sha256(blob_h)
    sha.update(blob_v)
    return {"name": os.path.basename(path), "tokens": int(values.size), "sha256": sha.hexdigest()}


class ShardWriter:
    """Cuts a stream of uint16 values into shards of `shard_tokens` (the last one partial).

    With min_last > 0, a final partial shard shorter than min_last is merged into the one before
    it (used by the smoke corpus so every train shard holds several batches).
    """

    def __init__(self, out_dir: str, pattern: str, shard_tokens: int = SHARD_TOKENS, min_last: int = 0):
        self.out_dir, self.pattern, self.shard_tokens, self.min_last = out_dir, pattern, shard_tokens, min_last
        self.chunks, self.count, self.held, self.shards = [], 0, None, []
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        self.chunks.append(values)
        self.count += values.size
        self.total += values.size
        while self.count >= self.shard_tokens:
            buf = np.concatenate(self.chunks)
            self._full(buf[: self.shard_tokens])
            rest = buf[self.shard_tokens:]
            self.chunks, self.count = ([rest] if rest.size else []), rest.size

    def _emit(self, values) -> None:
        path = os.path.join(self.out_dir, self.pattern % len(self.shards))
        self.shards.append(write_shard(path, values))

    def _full(self, values) -> None:
        if not self.min_last:
            return self._emit(values)
        if self.held is not None:
            self._emit(self.held)
        self.held = values.copy()

    def close(self) -> list:
        rest = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.uint16)
        if self.held is not None and rest.size < self.min_last:
            rest, self.held = np.concatenate([self.held, rest]), None
        if self.held is not None:
            self._emit(self.held)
        if rest.size:
            self._emit(rest)
        self.chunks, self.count, self.held = [], 0, None
        return self.shards


def concat_shards(paths) -> np.ndarray:
    return np.concatenate([train_gpt.read_shard(p) for p in paths]) if paths else np.zeros(0, np.uint16)


def doc_starts(tokens: np.ndarray) -> np.ndarray:
    return np.flatnonzero(tokens == BOS_ID)


def doc_hashes(tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """A 64-bit order-sensitive hash of every BOS-delimited document (vectorized, wraps mod 2^64).
    Tokens before the first BOS belong to no document and are ignored."""
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0:
        return np.zeros(0, np.uint64)
    t, starts = tokens[starts[0]:].astype(np.uint64), starts - starts[0]
    pos = (np.arange(t.size) - np.repeat(starts, np.diff(np.append(starts, t.size)))).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = (t + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) ^ pos * np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= mixed >> np.uint64(29)
        mixed *= np.uint64(0x94D049BB133111EB)
    return np.add.reduceat(mixed, starts)


def check_disjoint(val_files, train_files, bos_id: int = BOS_ID) -> int:
    """Refuse any train document with the same tokens as a val document; returns the number of
    val docs hashed. Documents straddling two train shards are hashed whole (each shard's
    unfinished last document is carried into the next); empty documents (BOS alone) are skipped.
    prepare.py and download.py run it when they build data; `prepare.py disjoint DIR` on demand."""
    def hashes(tokens):
        lengths = np.diff(np.append(np.flatnonzero(tokens == bos_id), tokens.size))
        return set(doc_hashes(tokens, bos_id)[lengths > 1].tolist())

    val = hashes(concat_shards(val_files))
    carry = np.zeros(0, np.uint16)
    for i, f in enumerate(train_files):
        tokens = np.concatenate([carry, train_gpt.read_shard(f)])
        starts = np.flatnonzero(tokens == bos_id)
        cut = starts[-1] if i < len(train_files) - 1 and starts.size else tokens.size
        body, carry = tokens[:cut], tokens[cut:]
        if val & hashes(body):
            raise DataError(f"{f}: train documents identical to val documents (train/val overlap)")
    return len(val)


def check_disjoint_dir(data_dir: str) -> int:
    """check_disjoint over the shards of `data_dir` that its manifest.json lists (train: those on disk)."""
    man = json.load(open(os.path.join(data_dir, "manifest.json")))
    paths = [[p for s in man[split]["shards"] if os.path.isfile(p := os.path.join(data_dir, s["name"]))]
             for split in ("val", "train")]
    return check_disjoint(*paths, man["tokenizer"].get("bos_id", BOS_ID))


def write_manifest(path: str, man: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(man, indent=1) + "\n")
    os.replace(tmp, path)


def finish_manifest(data_dir: str, man: dict, tok_path: str) -> dict:
    """Write manifest.json, then fill val.scored_bytes with what train_gpt's own loader assigns.

    The manifest is removed again if the scorer refuses the data, so no half-checked dataset is
    left behind.
    """
    mpath = os.path.join(data_dir, "manifest.json")
    write_manifest(mpath, man)
    try:
        h = train_gpt.load_config({"DATA_PATH": data_dir, "TOKENIZER_PATH": tok_path,
                                   "VOCAB_SIZE": str(man["tokenizer"]["vocab_size"])})
        spec = train_gpt.load_data_spec(h)
        man["val"]["scored_bytes"] = int(train_gpt.load_val_data(spec, h).target_bytes.sum())
    except Exception:
        os.remove(mpath)
        raise
    write_manifest(mpath, man)
    return man


# SentencePiece --------------------------------------------------------------------------------


def _varint(buf: bytes, i: int):
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, i
        shift += 7


def parse_sp_proto(buf: bytes):
    """(ids, begins, ends) of a serialized SentencePieceText.

    sentencepiece 0.2.3 dropped encode_as_immutable_proto and needs the protobuf package for
    out_type='proto'; out_type='serialized_proto' works in every version, so we read the wire
    format: field 2 = repeated piece {1 piece, 2 id, 3 surface, 4 begin, 5 end}, where begin/end
    are the UTF-8 byte offsets of the piece's surface in the input text.
    """
    ids, begins, ends = [], [], []
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
            continue
        if wire in (1, 5):
            i += 8 if wire == 1 else 4
            continue
        size, i = _varint(buf, i)
        if key != 0x12:  # not a piece (the text field)
            i += size
            continue
        end, pid, pb, pe = i + size, 0, 0, 0
        while i < end:  # inlined varint reads: this loop runs once per token
            k = buf[i]
            i += 1
            v = shift = 0
            while True:
                b = buf[i]
                i += 1
                v |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            if k & 7 == 2:
                i += v
            elif k == 0x10:
                pid = v
            elif k == 0x20:
                pb = v
            elif k == 0x28:
                pe = v
        ids.append(pid)
        begins.append(pb)
        ends.append(pe)
    return ids, begins, ends


class DocEncoder:
    """Turns documents into [BOS] + ids, and for sidecar variants the original bytes per token."""

    def __init__(self, model_path: str, variant: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.variant = variant

    def token_bytes(self, text: str):
        """ids and original-byte counts of one document (without BOS), from piece surfaces."""
        t = transform_text(self.variant, text)
        ids, begins, ends = parse_sp_proto(self.sp.encode(t, out_type="serialized_proto"))
        tb = t.encode("utf-8")
        if self.variant == "caseops":
            counts = lossless_caps.caseops_piece_bytes([tb[b:e].decode("utf-8") for b, e in zip(begins, ends)])
        elif self.variant == "casefold":
            if t.isascii():
                spans = list(zip(begins, ends))
            else:  # byte offsets -> char offsets
                char_at, pos = {0: 0}, 0
                for k, c in enumerate(t):
                    pos += len(c.encode("utf-8"))
                    char_at[pos] = k + 1
                spans = [(char_at[b], char_at[e]) for b, e in zip(begins, ends)]
            counts = lossless_caps.casefold_piece_bytes(text, spans)
        else:
            raise ValueError(f"variant {self.variant} has no byte sidecar")
        return ids, counts

    def encode_docs(self, texts, with_bytes: bool):
        """(tokens, sidecar or None, per-doc lengths incl. BOS, raw UTF-8 bytes of the texts)."""
        raw = sum(len(t.encode("utf-8")) for t in texts)
        if not with_bytes:
            docs = self.sp.encode([transform_text(self.variant, t) for t in texts], out_type=int, num_threads=1)
            side = None
        else:
            pairs = [self.token_bytes(t) for t in texts]
            docs = [p[0] for p in pairs]
            side = [c for p in pairs for c in [0] + p[1]]
            if side and max(side) > UINT16_MAX:
                raise DataError("a token accounts for more than 65535 original bytes (a huge "
                                "whitespace run?); the uint16 sidecar cannot hold it")
            side = np.array(side, dtype=np.uint16)
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        flat = [BOS_ID]
        for k, d in enumerate(docs):
            if k:
                flat.append(BOS_ID)
            flat.extend(d)
        tokens = np.array(flat if docs else [], dtype=np.uint16)
        return tokens, side, lengths, raw


_WORKER_ENCODER = None


def _worker_init(model_path: str, variant: str) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = DocEncoder(model_path, variant)


def _worker_encode(job):
    """job = (split, raw JSON lines, with_bytes) -> (split, tokens, sidecar, lengths, raw bytes)."""
    split, lines, with_bytes = job
    return (split, *_WORKER_ENCODER.encode_docs([doc_text(line) for line in lines], with_bytes))


def ordered_map(jobs, model_path: str, variant: str, workers: int):
    """Encode jobs in order, on `workers` processes, with bounded read-ahead (memory stays flat)."""
    if workers <= 1:
        _worker_init(model_path, variant)
        for job in jobs:
            yield _worker_encode(job)
        return
    import collections
    import multiprocessing as mp

    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(model_path, variant)) as pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(_worker_encode, (job,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def sentencepiece_normalized(sp, text: str) -> str:
    """The text SentencePiece encodes: nmt_nfkc, whitespace collapsed and stripped, as spaces."""
    return sp.normalize(text).replace("\u2581", " ")


class EdgeRule:
    """Which leading/trailing characters of a document SentencePiece drops (they count 0 bytes).

    Each char is classed by normalizing it between two letters: "space" if it becomes one `▁`
    (space, tab, newline, NBSP, ZWSP, ...), "removed" if it vanishes (most C0 controls, BOM),
    "content" otherwise. SentencePiece (remove_extra_whitespaces) drops every char before the
    first content char; at the end it drops the tail starting at the first space-class char
    after the last content char (a removed char before that space stays with the last piece).
    """

    def __init__(self, sp):
        self.sp, self.cache = sp, {}

    def kind(self, c: str) -> str:
        k = self.cache.get(c)
        if k is None:
            n = self.sp.normalize("a" + c + "a")
            k = self.cache[c] = "space" if n == "a\u2581a" else "removed" if n == "aa" else "content"
        return k

    def content_span(self, text: str):
        """(a, b): text[a:b] is what SentencePiece's pieces cover."""
        a, n = 0, len(text)
        while a < n and self.kind(text[a]) != "content":
            a += 1
        j = n
        while j > a and self.kind(text[j - 1]) != "content":
            j -= 1
        b = n
        for k in range(j, n):
            if self.kind(text[k]) == "space":
                b = k
                break
        return a, b
