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

Sentences are tokenized in batches with the fast tokenizer (one call for many
documents). :func:`greedy_cuts` and :func:`knowlm_spans` are the pure
algorithms, on lengths only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
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


# ------------------------------------------------------------------ chunker

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
    lengths: list = field(default_factory=list, repr=False)  # kept sample lengths

    def add(self, other: "ChunkStats") -> None:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if name == "lengths":
                self.lengths.extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def summary(self, max_len: int) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "lengths"}
        d["mean_fill"] = round(self.tokens / (self.samples * max_len), 4) if self.samples else 0.0
        return d


class Chunker:
    """Turn documents (lists of sentence strings) into samples of token ids.

    ``chunk(docs)`` tokenizes every sentence of every document in one batched
    call and packs each document; it returns, per document, a list of numpy
    int arrays (the samples). Counts accumulate in ``self.stats``.
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
        self.stats = ChunkStats()

    # -- tokenization ---------------------------------------------------------
    def tokenize(self, docs: list[list[str]]) -> list[list[list[int]]]:
        """Token ids of every sentence, one batched tokenizer call for all documents.

        Over-long sentences with line breaks are first cut at them (code);
        very long strings are tokenized in pieces and re-joined.
        """
        flat: list[str] = []
        owner: list[tuple[int, int]] = []   # (doc, unit) for every piece in flat
        units_per_doc = []
        # a sentence with line breaks longer than this many characters might exceed a sample
        split_lines_over = self.max_len
        for d, sentences in enumerate(docs):
            u = 0
            for s in sentences:
                parts = (s.splitlines(keepends=True)
                         if len(s) > split_lines_over and "\n" in s else [s])
                for part in parts:
                    for piece in _pieces(part):
                        flat.append(piece)
                        owner.append((d, u))
                    u += 1
            units_per_doc.append(u)
        out = [[[] for _ in range(n)] for n in units_per_doc]
        if flat:
            if self._backend is None:
                self._backend = _raw_backend(self.tokenizer)
            for (d, u), enc in zip(owner, self._backend.encode_batch_fast(
                    flat, add_special_tokens=False)):
                out[d][u].extend(enc.ids)
        return [[u for u in doc if u] for doc in out]

    # -- packing --------------------------------------------------------------
    def pack(self, sentences: list[list[int]]) -> tuple[list[np.ndarray], ChunkStats]:
        """Samples of one document from its tokenized sentences."""
        st = ChunkStats(documents=1, sentences=len(sentences))
        lengths = [len(s) for s in sentences]
        st.content_tokens = sum(lengths)
        if not sentences:
            return [], st
        if self.mode == "greedy":
            samples = self._pack_greedy(sentences, lengths, st)
        else:
            samples = self._pack_knowlm(sentences, st)
        kept = []
        for s in samples:
            if len(s) < self.min_len:
                st.dropped_samples += 1
                st.dropped_tokens += len(s)
            else:
                kept.append(s)
                st.lengths.append(len(s))
        st.samples, st.tokens = len(kept), sum(len(s) for s in kept)
        return kept, st

    def _pack_greedy(self, sentences, lengths, st):
        capacity = self.max_len - 1                       # <s> opens every sample
        st.long_sentences = sum(n > capacity for n in lengths)
        flat = np.fromiter(chain.from_iterable(sentences), dtype=np.int64, count=sum(lengths))
        flat = np.append(flat, self.eos)                  # </s> closes the document
        cuts = greedy_cuts(lengths + [1], capacity)
        samples, start = [], 0
        for end in cuts:
            samples.append(np.concatenate(([self.bos], flat[start:end])))
            start = end
        return samples

    def _pack_knowlm(self, sentences, st):
        # the original: <s> on the first sentence, </s> on the last, nothing in
        # between; a unit longer than max_len is cut into max_len-token blocks
        units = [list(s) for s in sentences]
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
        for sentences in self.tokenize(docs):
            samples, st = self.pack(sentences)
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
    ``"</s>"`` is encoded as text, never as the special token."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ChunkError("a Hugging Face *fast* tokenizer (tokenizer.json) is needed")
    backend = Tokenizer.from_str(backend.to_str())
    backend.encode_special_tokens = True
    return backend


def _pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
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


def strip_specials(sample, bos: int, eos: int) -> list[int]:
    """A sample's content: ids without the leading ``<s>`` / trailing ``</s>``."""
    ids = list(sample)
    if ids and ids[0] == bos:
        ids = ids[1:]
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids
