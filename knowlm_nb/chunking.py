"""Greedy packing of whole sentences into training samples of at most ``max_len`` tokens.

KnowLM cut its long zh/en/code documents into samples of at most 1024 tokens
that keep sentences whole and are as long and as few as possible. This module
does that, and fixes what the original got wrong:

* **greedy** (default): walk the sentences in order and put each one into the
  current sample while it fits; when it does not, close the sample and start a
  new one with it. Every sample is ``<s>`` + content, and the document's last
  sample also ends with ``</s>``; both are counted in the budget. A sentence
  that alone exceeds the budget (first re-split at its line breaks, if it has
  any) fills up the current sample and continues in full pieces, so no sample
  is ever longer than ``max_len``. Nothing is lost and nothing is repeated:
  the only loss is the explicit, counted drop of samples shorter than ``min_len``.
  For order-preserving packing the greedy count is minimal.
* **knowlm**: the original's algorithm, for comparison. After the forward
  pass it extends each sample *backwards* over previous sentences while they
  fit, so consecutive samples overlap and that text is trained on twice.

Each document is tokenized **once, whole** (one batched call of the fast
tokenizer for many documents), and its sentence ends are mapped to token
boundaries (from the tokens' byte lengths for a byte-level BPE, else from
their character offsets); packing cuts only at those boundaries. So the
samples hold exactly the document's own tokenization: no merge is lost at a
sentence boundary, and the cost is the tokenizer's. :func:`greedy_cuts` and
:func:`knowlm_spans` are the pure algorithms, on lengths only.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, chain
from pathlib import Path
from typing import Sequence

import numpy as np

MODES = ("greedy", "knowlm")
# sentences longer than this many characters are tokenized in pieces (cut at a
# space when there is one nearby): keeps tokenization linear for hostile input
PIECE_CHARS = 4096


class ChunkError(ValueError):
    """Bad chunking parameters; the message says which and why."""


def check_max_len(max_len: int, min_len: int = 0) -> None:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 3:
        raise ChunkError(f"max_len must be an int >= 3 (BOS + EOS + at least one token), "
                         f"got {max_len!r}")
    if not isinstance(min_len, int) or isinstance(min_len, bool) or not 0 <= min_len <= max_len:
        raise ChunkError(f"min_len must be an int between 0 and max_len={max_len}, got {min_len!r}")


# ------------------------------------------------------------ the algorithms

def greedy_cuts(lengths: Sequence[int], capacity: int) -> list[int]:
    """Where greedy packing cuts the concatenated sentences (token offsets).

    ``lengths`` are the sentence lengths in tokens, ``capacity`` the tokens a
    sample may hold. Returns the end offset of every sample: sample ``k`` is
    tokens ``[cuts[k-1], cuts[k])``. A cut falls inside a sentence only when
    that sentence alone is longer than ``capacity``.
    """
    cuts: list[int] = []
    start = 0      # where the current sample begins
    pos = 0        # end of the sentences taken so far
    for n in lengths:
        if pos + n - start <= capacity:      # the sentence fits: take it
            pos += n
        elif n <= capacity:                  # it fits alone: close the sample, open a new one
            cuts.append(pos)
            start, pos = pos, pos + n
        else:                                # longer than a sample: fill up, then full pieces
            pos += n
            while pos - start > capacity:
                start += capacity
                cuts.append(start)
    if pos > start:
        cuts.append(pos)
    return cuts


def knowlm_spans(lengths: Sequence[int], max_len: int) -> list[tuple[int, int]]:
    """The original's packing: ``[start, end)`` sentence ranges of each sample.

    Forward: accumulate sentences while they fit. Then, KnowLM's twist, go
    *backwards* from the sample's first sentence over earlier sentences
    (already used by the previous sample) while they still fit.
    """
    spans = []
    i = 0
    while i < len(lengths):
        total = lengths[i]
        j = i + 1
        while j < len(lengths) and total + lengths[j] <= max_len:
            total += lengths[j]
            j += 1
        start = i
        while start - 1 >= 0 and total + lengths[start - 1] <= max_len:
            total += lengths[start - 1]
            start -= 1
        spans.append((start, j))
        i = j
    return spans


@contextmanager
def one_tokenizer_thread(active: bool = True):
    """Meanwhile, tokenizer calls in this process and in the processes it starts
    run on one thread each (no-op when not ``active``).

    Sets ``TOKENIZERS_PARALLELISM=false``, which the tokenizers library reads at
    every call and child processes inherit, and restores what was there after:
    ``num_proc`` processes on ``num_proc`` cores, not each with its own thread pool.
    """
    if not active:
        yield
        return
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


# ------------------------------------------------------------------ chunker

class TokenizerFiles:
    """The parts of a saved Hugging Face fast tokenizer the chunker needs, read
    without importing ``transformers`` (seconds of start-up in every worker).

    ``backend_tokenizer`` (the Rust tokenizer), ``bos_token_id``,
    ``eos_token_id`` and ``len()`` (the vocabulary with added tokens), as on a
    ``PreTrainedTokenizerFast``; :class:`Chunker` takes either.
    """

    def __init__(self, folder):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ChunkError(f"no fast tokenizer (tokenizer.json) in {folder}")
        self.backend_tokenizer = Tokenizer.from_file(str(path))
        names = {}
        for conf in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / conf).is_file():
                for key, value in json.loads((folder / conf).read_text(encoding="utf-8")).items():
                    if isinstance(value, dict):
                        value = value.get("content")
                    if key in ("bos_token", "eos_token") and isinstance(value, str):
                        names.setdefault(key, value)
        self.bos_token_id, self.eos_token_id = (
            self.backend_tokenizer.token_to_id(names[k]) if k in names else None
            for k in ("bos_token", "eos_token"))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


@dataclass
class ChunkStats:
    """What the chunker did, summed over documents."""
    documents: int = 0
    sentences: int = 0
    long_sentences: int = 0        # longer than a sample alone, cut at token boundaries
    content_tokens: int = 0        # tokens of the documents' sentences
    samples: int = 0               # samples kept
    tokens: int = 0                # tokens in kept samples (specials included)
    duplicated_tokens: int = 0     # tokens that appear in more than one sample (knowlm mode)
    dropped_samples: int = 0       # shorter than min_len
    dropped_tokens: int = 0
    long_documents: int = 0        # documents longer than one sample: they can fill theirs
    long_samples: int = 0          # their samples
    long_tokens: int = 0           # and tokens
    lengths: list = field(default_factory=list, repr=False)  # kept sample lengths

    @classmethod
    def counts(cls) -> list[str]:
        """The count fields (all but ``lengths``), in a fixed order: the columns of :meth:`row`."""
        return [k for k in cls.__dataclass_fields__ if k != "lengths"]

    def row(self) -> list[int]:
        """The counts as a list (cheap to send between processes); :meth:`add_row` adds one."""
        return [getattr(self, k) for k in self.counts()]

    def add_row(self, row) -> None:
        for name, value in zip(self.counts(), row):
            setattr(self, name, getattr(self, name) + int(value))

    def add(self, other: "ChunkStats") -> None:
        mine = self.__dict__
        for name, value in other.__dict__.items():
            if name == "lengths":
                self.lengths.extend(value)
            else:
                mine[name] += value

    def summary(self, max_len: int) -> dict:
        d = {k: getattr(self, k) for k in self.counts()}
        d["mean_fill"] = _fill(self.tokens, self.samples, max_len)
        # a document shorter than max_len cannot fill its one sample: report the two apart
        d["mean_fill_long"] = _fill(self.long_tokens, self.long_samples, max_len)
        d["mean_fill_short"] = _fill(self.tokens - self.long_tokens,
                                     self.samples - self.long_samples, max_len)
        return d


def _fill(tokens: int, samples: int, max_len: int) -> float:
    return round(tokens / (samples * max_len), 4) if samples else 0.0


class Chunker:
    """Turn documents (lists of sentence strings) into samples of token ids.

    ``chunk(docs)`` tokenizes every document *once*, whole (one batched
    tokenizer call for all of them), finds the token boundary at the end of
    each sentence, and packs each document on those boundaries. It returns,
    per document, a list of numpy int arrays (the samples) whose content is
    exactly the document's own tokenization. Counts accumulate in
    ``self.stats``; the tokenizer's work (calls, strings, characters, tokens)
    in ``self.work``.
    """

    def __init__(self, tokenizer, max_len: int, mode: str = "greedy", min_len: int = 0):
        check_max_len(max_len, min_len)
        if mode not in MODES:
            raise ChunkError(f"mode must be one of {MODES}, got {mode!r}")
        self.tokenizer, self.max_len, self.mode, self.min_len = tokenizer, max_len, mode, min_len
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.bos is None or self.eos is None:
            raise ChunkError("the tokenizer needs a BOS and an EOS token")
        self._backend = None          # the Rust tokenizer, made on first use
        self._byte_len = None         # bytes per token id, for a byte-level BPE
        self.stats = ChunkStats()
        self.work: Counter = Counter()

    # -- tokenization ---------------------------------------------------------
    def units(self, sentences: list[str]) -> list[str]:
        """What a document is packed in: its sentences, except that a sentence
        longer than ``max_len`` characters with line breaks (code) is cut at
        them, so that it can be packed line by line."""
        out = []
        for s in sentences:
            if len(s) > self.max_len and "\n" in s:
                out.extend(s.splitlines(keepends=True))
            elif s:
                out.append(s)
        return out

    def tokenize(self, docs: list[list[str]]) -> list[tuple[np.ndarray, list[int]]]:
        """Each document tokenized once, whole: ``(ids, token length of each unit)``.

        One batched tokenizer call for all the documents. A unit (see
        :meth:`units`) ends after the last token that ends inside it (a token
        that straddles a sentence end, rare, opens the next unit). A unit
        longer than :data:`PIECE_CHARS` characters is tokenized in pieces, cut
        at a space when one is near, so that hostile input costs linear time.
        """
        if self._backend is None:
            self._backend, self._byte_len = _raw_backend(self.tokenizer)
        # unit ends are counted in what the tokens can be mapped back to: bytes
        # for a byte-level BPE, else characters (the tokenizer's offsets)
        size = _utf8_len if self._byte_len is not None else len
        segments: list[str] = []            # the strings the tokenizer gets
        ends: list[list[int]] = []          # per segment: where its units end
        owner: list[int] = []               # per segment: its document
        for d, sentences in enumerate(docs):
            units = self.units(sentences)
            if units and max(map(len, units)) <= PIECE_CHARS:     # the common case
                segments.append("".join(units))
                ends.append(list(accumulate(map(size, units))))
                owner.append(d)
                continue
            cur: list[str] = []
            cur_ends: list[int] = []
            at = 0
            for u in units:
                if len(u) <= PIECE_CHARS:
                    cur.append(u)
                    at += size(u)
                    cur_ends.append(at)
                    continue
                if cur:
                    segments.append("".join(cur)), ends.append(cur_ends), owner.append(d)
                    cur, cur_ends, at = [], [], 0
                parts = pieces(u)
                for k, part in enumerate(parts):
                    segments.append(part), owner.append(d)
                    ends.append([size(part)] if k == len(parts) - 1 else [])
            if cur:
                segments.append("".join(cur)), ends.append(cur_ends), owner.append(d)
        ids_of: list[list[np.ndarray]] = [[] for _ in docs]
        lengths_of: list[list[int]] = [[] for _ in docs]
        carry = [0] * len(docs)             # tokens of a unit begun in an earlier segment
        for d, ids, bounds in zip(owner, *self._encode(segments, ends)):
            ids_of[d].append(ids)
            prev = 0
            for b in bounds:
                lengths_of[d].append(carry[d] + b - prev)
                carry[d], prev = 0, b
            carry[d] += len(ids) - prev
        return [(ids[0] if len(ids) == 1 else
                 np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64),
                 [n for n in lengths if n])
                for ids, lengths in zip(ids_of, lengths_of)]

    def _encode(self, segments: list[str], ends: list[list[int]]):
        """Token ids of every segment (one tokenizer call), and the number of
        tokens that end at or before each of its unit ends."""
        if not segments:
            return [], []
        self.work.update(calls=1, strings=len(segments), chars=sum(map(len, segments)))
        self.work["longest"] = max(self.work["longest"], max(map(len, segments)))
        n_ends = [len(e) for e in ends]
        if self._byte_len is not None:
            # byte-level BPE: every token is a run of the text's UTF-8 bytes, so the
            # running sum of the tokens' byte lengths says where each token ends;
            # all segments at once, as if concatenated
            encs = self._backend.encode_batch_fast(segments, add_special_tokens=False)
            ids = [np.array(e.ids, dtype=np.int64) for e in encs]
            counts = np.array([len(i) for i in ids], dtype=np.int64)
            flat = np.concatenate(ids)
            tok_end = np.cumsum(self._byte_len[flat])
            seg_len = np.array([_utf8_len(seg) for seg in segments], dtype=np.int64)
            seg_end = np.cumsum(seg_len)
            has = counts > 0
            if not np.array_equal(tok_end[(np.cumsum(counts) - 1)[has]], seg_end[has]):
                # not a plain byte-level BPE after all: use the offsets and character ends
                self._byte_len = None
                return self._encode(segments, [_char_ends(seg, e) for seg, e in
                                               zip(segments, ends)])
            seg_start = np.repeat(seg_end - seg_len, n_ends)
            tok_start = np.repeat(np.cumsum(counts) - counts, n_ends)
            flat_ends = np.fromiter(chain.from_iterable(ends), dtype=np.int64)
            bounds = np.searchsorted(tok_end, seg_start + flat_ends, side="right") - tok_start
        else:
            # any other fast tokenizer: the character offsets of every token
            ids, parts = [], []
            for seg_ends, enc in zip(ends, self._backend.encode_batch(
                    segments, add_special_tokens=False)):
                ids.append(np.array(enc.ids, dtype=np.int64))
                tok_end = np.maximum.accumulate(np.array([e for _, e in enc.offsets] or [0]))
                parts.append(np.searchsorted(tok_end[:len(ids[-1])], seg_ends, side="right"))
            counts = np.array([len(i) for i in ids], dtype=np.int64)
            bounds = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        all_bounds = np.split(bounds, np.cumsum(n_ends)[:-1]) if len(n_ends) > 1 else [bounds]
        out_bounds = []
        for n, b in zip(counts.tolist(), all_bounds):
            b = b.tolist()
            if b:
                b[-1] = n                      # the segment's last unit takes every token left
            out_bounds.append(b)
        self.work["tokens"] += int(counts.sum())
        return ids, out_bounds

    # -- packing --------------------------------------------------------------
    def pack(self, sentences: list[list[int]]) -> tuple[list[np.ndarray], ChunkStats]:
        """Samples of one document from its sentences' token ids."""
        lengths = [len(s) for s in sentences]
        ids = np.fromiter(chain.from_iterable(sentences), dtype=np.int64, count=sum(lengths))
        return self.pack_tokens(ids, lengths)

    def pack_tokens(self, ids: np.ndarray,
                    lengths: list[int]) -> tuple[list[np.ndarray], ChunkStats]:
        """Samples of one document from its token ids and its units' lengths
        (``sum(lengths) == len(ids)``)."""
        flat, sizes, st = self.pack_flat(ids, lengths)
        ends = np.cumsum(sizes).tolist()
        return [flat[a:b] for a, b in zip([0] + ends, ends)], st

    def pack_flat(self, ids: np.ndarray,
                  lengths: list[int]) -> tuple[np.ndarray, np.ndarray, ChunkStats]:
        """:meth:`pack_tokens` as one array: ``(the samples concatenated, their sizes, stats)``."""
        lengths = [n for n in lengths if n]
        st = ChunkStats(documents=1, sentences=len(lengths), content_tokens=len(ids))
        if sum(lengths) != len(ids):
            raise ChunkError(f"unit lengths add up to {sum(lengths)} tokens, the document has "
                             f"{len(ids)}")
        if not lengths:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), st
        if self.mode == "greedy":
            flat, sizes = self._pack_greedy(ids, lengths, st)
        else:
            samples = self._pack_knowlm(ids, lengths, st)
            flat, sizes = np.concatenate(samples), [len(x) for x in samples]
        if self.min_len and min(sizes) < self.min_len:
            keep = [n >= self.min_len for n in sizes]
            st.dropped_samples = keep.count(False)
            st.dropped_tokens = sum(n for n, k in zip(sizes, keep) if not k)
            flat = flat[np.repeat(keep, sizes)]
            sizes = [n for n, k in zip(sizes, keep) if k]
        st.lengths.extend(sizes)
        st.samples, st.tokens = len(sizes), sum(sizes)
        if len(ids) + 2 > self.max_len:     # a long document: it can fill its samples
            st.long_documents, st.long_samples, st.long_tokens = 1, st.samples, st.tokens
        return flat, np.array(sizes, dtype=np.int64), st

    def _pack_greedy(self, ids, lengths, st):
        capacity = self.max_len - 1                       # <s> opens every sample
        st.long_sentences = sum(n > capacity for n in lengths)
        cuts = greedy_cuts(lengths + [1], capacity)       # </s> closes the document
        # sample k is <s> + content[cuts[k-1]:cuts[k]], so in the output it is
        # shifted right by the k <s> tokens before it; the last content is </s>
        flat = np.empty(len(ids) + 1 + len(cuts), dtype=ids.dtype)
        flat[-1] = self.eos
        sizes, start = [], 0
        for k, end in enumerate(cuts):
            flat[start + k] = self.bos
            stop = min(end, len(ids))
            flat[start + k + 1:stop + k + 1] = ids[start:stop]
            sizes.append(end - start + 1)
            start = end
        return flat, sizes

    def _pack_knowlm(self, ids, lengths, st):
        # the original: <s> on the first sentence, </s> on the last, nothing in
        # between; a unit longer than max_len is cut into max_len-token blocks
        units = [u.tolist() for u in np.split(ids, np.cumsum(lengths)[:-1])]
        units[0] = [self.bos] + units[0]
        units[-1] = units[-1] + [self.eos]
        blocks = []
        for u in units:
            if len(u) > self.max_len:
                st.long_sentences += 1
                blocks.extend(u[k:k + self.max_len] for k in range(0, len(u), self.max_len))
            else:
                blocks.append(u)
        spans = knowlm_spans([len(b) for b in blocks], self.max_len)
        samples = [np.array([t for b in blocks[a:b] for t in b], dtype=np.int64)
                   for a, b in spans]
        st.duplicated_tokens = sum(len(s) for s in samples) - sum(len(b) for b in blocks)
        return samples

    def chunk(self, docs: list[list[str]]) -> list[list[np.ndarray]]:
        """Samples of every document (lists of sentence strings)."""
        out = []
        for ids, lengths in self.tokenize(docs):
            samples, st = self.pack_tokens(ids, lengths)
            self.stats.add(st)
            out.append(samples)
        return out


def compare_modes(tokenizer, docs: list[list[str]], max_len: int) -> list[dict]:
    """Greedy vs knowlm on the same documents: samples, tokens, duplicated tokens, fill."""
    rows = []
    for mode in MODES:
        chunker = Chunker(tokenizer, max_len, mode=mode)
        chunker.chunk(docs)
        s = chunker.stats.summary(max_len)
        rows.append({"mode": mode, "samples": s["samples"], "tokens": s["tokens"],
                     "content_tokens": s["content_tokens"],
                     "duplicated_tokens": s["duplicated_tokens"],
                     "duplicated_share": round(s["duplicated_tokens"] / s["tokens"], 4),
                     "mean_fill": s["mean_fill"]})
    return rows


def _raw_backend(tokenizer):
    """The Rust tokenizer behind a HF fast tokenizer, copied so that text such as
    ``"</s>"`` is encoded as text, never as the special token; and, for a plain
    byte-level BPE (no normalizer), the number of text bytes of every token id."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ChunkError("a Hugging Face *fast* tokenizer (tokenizer.json) is needed")
    spec = backend.to_str()
    backend = Tokenizer.from_str(spec)
    backend.encode_special_tokens = True
    spec = json.loads(spec)
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = (spec.get("normalizer") is None and spec["model"].get("type") == "BPE"
                  and any(s.get("type") == "ByteLevel" for s in steps))
    if not byte_level:
        return backend, None
    # in a byte-level vocabulary every character of a token stands for one byte
    byte_len = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        byte_len[i] = len(token)
    return backend, byte_len


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _char_ends(text: str, byte_ends: list[int]) -> list[int]:
    """Character offsets of rising UTF-8 byte offsets into ``text``."""
    if text.isascii():
        return list(byte_ends)
    per_char = np.cumsum([len(ch.encode("utf-8")) for ch in text])
    return np.searchsorted(per_char, byte_ends, side="right").tolist()


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, at a space when one is near."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        space = text.rfind(" ", end - size // 8, end)
        if space > start:
            end = space
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces
