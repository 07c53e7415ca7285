"""Corpus preparation: read, clean, deduplicate, split into sentences, pack, mix, write.

``prepare`` streams JSONL records (``{"text", "lang", "source", ...}``) and
plain-text files (one document per file) from globs, never holding the corpus
in memory, and writes a Megatron indexed dataset (``PREFIX.bin`` +
``PREFIX.idx``) plus ``PREFIX.stats.json``:

1. **read**: a malformed JSON line, invalid UTF-8 or a missing / non-string
   ``text`` is skipped and counted with its ``file:line`` (``strict=True``
   fails on the first one instead);
2. **clean**: Unicode NFC, control characters removed (tabs kept in code),
   line ends unified; quality filters drop too-short, mostly-symbol and
   repetitive documents;
3. **deduplicate**: exact duplicates by hash, near duplicates with MinHash
   LSH (datasketch) over character 5-grams;
4. **split** into sentences offline: Chinese by regex (closing quotes and
   brackets stay with their sentence), English with sentencex (rule-based:
   abbreviations, decimals, initials) and at line breaks, code between lines
   at blank lines and top-level blocks;
5. **pack** with :mod:`knowlm_nb.chunking` (each document tokenized once,
   whole, in batches; ``num_proc`` worker processes over documents);
6. **mix**: per-language weights (default KnowLM's zh 5.5M : en 1.5M : code
   0.9M samples) give a deterministic blended order, as Megatron's
   ``BlendedDataset`` does; the output holds the samples in that order.

CLI::

    python -m knowlm_nb.corpus prepare --input 'data_samples/corpus/*.jsonl' \\
        --tokenizer runs/tiny/00/tokenizer --max-len 256 --out runs/tiny/01/pretrain_text_document
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
from multiprocessing.pool import AsyncResult
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import chunking, files, indexed_dataset

JSONL_SUFFIXES = (".jsonl", ".json")
CODE_SUFFIXES = (".py", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".java", ".go", ".rs", ".sh")
# KnowLM's pretraining mix: 5.5M Chinese, 1.5M English, 0.9M code samples
KNOWLM_WEIGHTS = {"zh": 5.5, "en": 1.5, "code": 0.9}
MAX_BAD_LINES_LISTED = 50


class CorpusError(ValueError):
    """Bad corpus input or parameters; the message says what and where."""


# ------------------------------------------------------------------ reading

@dataclass
class Document:
    text: str
    lang: str
    source: str
    where: str          # "file:line" (JSONL) or "file" (plain text)


@dataclass
class ReadReport:
    """Lines that could not be read, by reason, with where they were."""
    counts: Counter = field(default_factory=Counter)
    per_source: dict = field(default_factory=lambda: defaultdict(Counter))
    examples: list = field(default_factory=list)

    def add(self, where: str, source: str, reason: str) -> None:
        self.counts[reason] += 1
        self.per_source[source][reason] += 1
        if len(self.examples) < MAX_BAD_LINES_LISTED:
            self.examples.append({"where": where, "reason": reason})


def input_files(inputs: Iterable[str]) -> list[Path]:
    """Files matching the globs (relative to the repository root, or absolute)."""
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    inputs = list(inputs)
    if not inputs:
        raise CorpusError("no inputs given")
    found_all: list[Path] = []
    for pattern in inputs:
        try:
            found = files.find_files(str(pattern))
        except files.FilesError:
            raise CorpusError(f"no files match {pattern!r}") from None
        found_all.extend(f for f in found if f not in found_all)
    return found_all


def guess_lang(text: str, suffix: str = "") -> str:
    """``code`` for source files (by file ``suffix``), ``zh`` when CJK characters dominate, else ``en``."""
    if suffix in CODE_SUFFIXES:
        return "code"
    sample = text[:2000]
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in sample)
    letters = sum(ch.isalpha() for ch in sample)
    return "zh" if letters and cjk / letters > 0.3 else "en"


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """A JSONL line as ``(record, None)``, or ``(None, reason)``; blank lines give ``(None, None)``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if not line.strip():
        return None, None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None, "malformed_json"
    if not isinstance(rec, dict) or "text" not in rec:
        return None, "missing_text"
    if not isinstance(rec["text"], str):
        return None, "text_not_string"
    return rec, None


def raw_batches(paths: Iterable[Path], size: int) -> Iterator[list[tuple]]:
    """The raw records of the files in batches of about ``size``, read without parsing.

    A batch is a list of runs ``(path, source, suffix, first_line, [raw bytes, ...])``:
    consecutive lines of one JSONL file from line ``first_line`` on, or a whole
    plain-text file (``first_line`` ``None``). Parsing is :func:`to_document`'s
    job, so that ``prepare`` can leave it to its worker processes.
    """
    batch, n = [], 0
    for path in paths:
        path = Path(path)
        # source: per input file (a record's "source" is often a licence tag)
        if path.suffix not in JSONL_SUFFIXES:
            batch.append((str(path), path.stem, path.suffix, None, [path.read_bytes()]))
            n += 1
        else:
            with open(path, "rb") as fh:
                first = 1
                while lines := list(islice(fh, size - n)):
                    batch.append((str(path), path.stem, path.suffix, first, lines))
                    first += len(lines)
                    n += len(lines)
                    if n >= size:
                        yield batch
                        batch, n = [], 0
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def records(batch: list[tuple]) -> Iterator[tuple[str, str, str, bytes]]:
    """``(where, source, suffix, raw bytes)`` of every record of a :func:`raw_batches` batch;
    ``where`` is ``file:line`` for JSONL, the file for plain text."""
    for path, source, suffix, first, raws in batch:
        for k, raw in enumerate(raws):
            yield (path if first is None else f"{path}:{first + k}"), source, suffix, raw


def raw_records(paths: Iterable[Path]) -> Iterator[tuple[str, str, str, bytes]]:
    """:func:`records` of every batch: the files' raw records one by one."""
    for batch in raw_batches(paths, 256):
        yield from records(batch)


def to_document(where: str, source: str, suffix: str,
                raw: bytes) -> tuple[Document | None, str | None]:
    """A raw record as ``(Document, None)`` or ``(None, reason)``; a blank line gives ``(None, None)``."""
    if suffix not in JSONL_SUFFIXES:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        return Document(text, guess_lang(text, suffix), source, where), None
    rec, reason = _parse_line(raw)
    if rec is None:
        return None, reason
    lang = rec.get("lang") if isinstance(rec.get("lang"), str) else None
    return Document(rec["text"], lang or guess_lang(rec["text"], suffix), source,
                    where), None


def _unreadable(where: str, reason: str) -> CorpusError:
    return CorpusError(f"{where}: {reason.replace('_', ' ')}")


def iter_documents(paths: Iterable[Path], strict: bool = False,
                   problems: ReadReport | None = None) -> Iterator[Document]:
    """Stream documents from JSONL and plain-text files, one at a time.

    Unreadable lines are skipped and recorded in ``problems`` (or, with
    ``strict``, raise :class:`CorpusError` naming ``file:line`` and why).
    """
    problems = problems if problems is not None else ReadReport()
    for record in raw_records(paths):
        doc, reason = to_document(*record)
        if reason:
            if strict:
                raise _unreadable(record[0], reason)
            problems.add(record[0], record[1], reason)
        elif doc is not None:
            yield doc


def scan(inputs) -> list[dict]:
    """Per source: files, documents, characters and languages (a first look, no cleaning)."""
    rows: dict[str, dict] = {}
    problems = ReadReport()
    for doc in iter_documents(input_files(inputs), problems=problems):
        row = rows.setdefault(doc.source, {"source": doc.source, "documents": 0,
                                           "chars": 0, "langs": Counter()})
        row["documents"] += 1
        row["chars"] += len(doc.text)
        row["langs"][doc.lang] += 1
    out = []
    for row in rows.values():
        row["langs"] = ", ".join(f"{k}:{v}" for k, v in row["langs"].most_common())
        row["unreadable"] = sum(problems.per_source.get(row["source"], {}).values())
        out.append(row)
    return out


# ----------------------------------------------------------------- cleaning

_TRAILING_SPACE = re.compile(r"[ \u3000]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
# anything normalize changes in prose besides NFC and the outer strip: \r and other
# control characters (tab included), spaces before a line break, 3+ line breaks
_PROSE_WORK = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]"
                         r"|[ \u3000]\n|\n\n\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")


@dataclass
class Filters:
    """Simple quality filters; a document failing one is dropped with that reason."""
    min_chars: int = 20            # too_short
    min_text_ratio: float = 0.5    # low_text_ratio: letters (any script) / non-space chars
    max_dup_line_ratio: float = 0.5  # repetitive: repeated non-blank lines / lines


def normalize(text: str, lang: str) -> str:
    """NFC, unified line ends, control characters removed (tabs kept in code),
    trailing spaces and runs of blank lines trimmed in prose."""
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if lang == "code":
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return _CONTROL.sub("", text).strip("\n")
    if _PROSE_WORK.search(text):          # most documents need none of this
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        text = _TRAILING_SPACE.sub("\n", text.replace("\t", " "))
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def quality_reason(text: str, lang: str, filters: Filters = Filters()) -> str | None:
    """Why a cleaned document should be dropped, or ``None`` to keep it."""
    if len(text) < filters.min_chars:
        return "too_short"
    if lang != "code":
        visible, letters = _count_visible_and_letters(text[:20000])
        if visible and letters / visible < filters.min_text_ratio:
            return "low_text_ratio"
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    if len(lines) >= 4:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > filters.max_dup_line_ratio:
            return "repetitive"
    return None


_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())
_BMP_CLASSES: np.ndarray | None = None     # per code point < 65536: 1 space, 2 letter


def _count_visible_and_letters(text: str) -> tuple[int, int]:
    """Characters that are not whitespace, and letters (``str.isalpha``), vectorized."""
    global _BMP_CLASSES
    if text.isascii():
        raw = text.encode("ascii")
        spaces = len(raw) - len(raw.translate(None, _ASCII_SPACE))
        return len(raw) - spaces, len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    if _BMP_CLASSES is None:
        chars = [chr(i) for i in range(65536)]
        _BMP_CLASSES = (np.fromiter(map(str.isspace, chars), dtype=np.uint8, count=65536)
                        + 2 * np.fromiter(map(str.isalpha, chars), dtype=np.uint8, count=65536))
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    bmp = cps < 65536
    counts = np.bincount(_BMP_CLASSES[cps[bmp]], minlength=3)
    rest = [chr(c) for c in cps[~bmp].tolist()]              # beyond the BMP: rare
    spaces = int(counts[1]) + sum(map(str.isspace, rest))
    return len(text) - spaces, int(counts[2]) + sum(map(str.isalpha, rest))


# -------------------------------------------------------------------- dedup

NUM_PERM = 64
SHINGLE = 5
SCHEME = "affine32"  # datasketch's hashing scheme, stated so signatures can cross processes


def exact_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def minhash_values(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash signature of the character 5-grams of ``text`` (whitespace-collapsed)."""
    from datasketch import MinHash

    flat = " ".join(text.lower().split())[:100_000]
    shingles = {flat[i:i + SHINGLE] for i in range(max(1, len(flat) - SHINGLE + 1))}
    m = MinHash(num_perm=num_perm, scheme=SCHEME)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return m.hashvalues


class Deduper:
    """Exact (hash) and near (MinHash LSH, Jaccard >= ``threshold``) duplicate detection."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.num_perm = num_perm
        self.seen: set[str] = set()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.n = 0

    def check(self, key: str, values: np.ndarray) -> str | None:
        """``"exact_duplicate"``, ``"near_duplicate"`` or ``None`` (then remembered)."""
        from datasketch import MinHash

        if key in self.seen:
            return "exact_duplicate"
        m = MinHash(num_perm=self.num_perm, hashvalues=values, scheme=SCHEME)
        if self.lsh.query(m):
            return "near_duplicate"
        self.seen.add(key)
        self.lsh.insert(str(self.n), m)
        self.n += 1
        return None


# --------------------------------------------------------- sentence splitting

_ZH_END = "。！？；!?;"
_ZH_CLOSE = "”’\"'」』）)］]】》〉"
_ZH_SENT = re.compile(
    rf"[^{re.escape(_ZH_END)}…\n]*(?:(?:[{re.escape(_ZH_END)}]|…+)+[{re.escape(_ZH_CLOSE)}]*\n*|\n+|$)")
_EN_END = re.compile(r"[.!?]")
_LINES = re.compile(r"[^\n]*\n*")
_SPACES = re.compile(r"\s*")
_CODE_BLOCK = re.compile(r"(async\s+def|def|class|function|fn|func|public|private|"
                         r"static|struct|impl|interface|#include|@)\b|@")


def split_zh(text: str) -> list[str]:
    """Chinese: after 。！？；… (and ASCII !?;) or line breaks; closing quotes and
    brackets stay with their sentence."""
    return [m.group(0) for m in _ZH_SENT.finditer(text) if m.group(0)]


def split_en(text: str) -> list[str]:
    """English with sentencex (rule-based, offline, lossless), plus a cut after every line break.

    Whitespace between sentences starts the next sentence (as the tokenizer
    sees it in running text); line breaks end the sentence before them.
    """
    if not _EN_END.search(text):
        return [m.group(0) for m in _LINES.finditer(text) if m.group(0)]
    from sentencex import segment

    bounds = {m.end() for m in _LINES.finditer(text)}          # after each run of line breaks
    segments = list(segment("en", text))
    if sum(map(len, segments)) != len(text):     # never seen; then only the line breaks
        segments = []
    pos = 0
    for seg in segments:
        pos += len(seg)
        # a sentence ends after its last visible character; the space after it
        # starts the next one, unless it holds a line break (counted above)
        end = pos - (len(seg) - len(seg.rstrip()))
        if "\n" not in _SPACES.match(text, end).group(0):
            bounds.add(end)
    bounds = sorted(b for b in bounds if 0 < b < len(text) and text[b:].strip())
    return [text[a:b] for a, b in zip([0] + bounds, bounds + [len(text)])]


def split_code(text: str) -> list[str]:
    """Code: whole lines, grouped into blocks that end at blank lines or before
    a top-level definition; never cuts inside a line."""
    blocks: list[str] = []
    cur: list[str] = []
    prev_blank = False
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        top = not blank and not line[0].isspace() and _CODE_BLOCK.match(line)
        if cur and not blank and (prev_blank or top) and not _is_decorated(cur):
            blocks.append("".join(cur))
            cur = []
        cur.append(line)
        prev_blank = blank
    if cur:
        blocks.append("".join(cur))
    return blocks


def _is_decorated(lines: list[str]) -> bool:
    last = next((ln for ln in reversed(lines) if ln.strip()), "")
    return last.startswith("@")


def split_sentences(text: str, lang: str) -> list[str]:
    """Sentences (code: blocks) of ``text``; they concatenate back to ``text``."""
    if lang == "zh":
        return split_zh(text)
    if lang == "code":
        return split_code(text)
    return split_en(text)


def cleaned_sentences(inputs, dedup: bool = True) -> Iterator[tuple[Document, list[str]]]:
    """In one process: every document that survives cleaning and dedup, with its
    sentences (what :func:`prepare` packs; for looking and comparing)."""
    deduper = Deduper() if dedup else None
    for doc in iter_documents(input_files(inputs)):
        text = normalize(doc.text, doc.lang)
        if quality_reason(text, doc.lang):
            continue
        if deduper is not None and deduper.check(exact_key(text), minhash_values(text)):
            continue
        yield Document(text, doc.lang, doc.source, doc.where), split_sentences(text, doc.lang)


# ------------------------------------------------------- per-document worker

_worker: dict = {}
# workers start by fork on Linux (no re-import: ~0.3 s less per worker); they tokenize
# on one thread each (prepare sets TOKENIZERS_PARALLELISM=false for them and itself)
_START = "fork" if sys.platform == "linux" else "spawn"


def _init_worker(tokenizer_dir: str, max_len: int, mode: str, min_len: int, dedup: bool,
                 dtype: str):
    tok = chunking.TokenizerFiles(tokenizer_dir)
    _worker.update(chunker=chunking.Chunker(tok, max_len, mode=mode, min_len=min_len),
                   dedup=dedup, dtype=np.dtype(dtype))


def _in_order(batches: Iterator, pool, workers: int, per_worker: int = 2) -> Iterator[dict]:
    """:func:`_process` of every batch, in order, shared between ``pool`` (of
    ``workers`` processes) and this process.

    Each worker has at most ``per_worker`` batches queued; while the oldest
    batch is not done and the workers' queues are full, this process takes the
    next batch itself instead of waiting. So ``num_proc`` processes work (not
    ``num_proc - 1`` workers and an idle main process), and at the end the main
    process waits for at most ``per_worker`` batches per worker. Memory stays
    bounded: at most a few dozen batches are held.
    """
    if pool is None:
        yield from map(_process, batches)
        return
    window = per_worker * workers
    pending: deque = deque()       # AsyncResults (in a worker) and done results, in order
    in_flight = 0
    batches = iter(batches)
    more = True
    while more or pending:
        head = pending[0] if pending else None
        waiting = isinstance(head, AsyncResult)
        if head is not None and (not waiting or head.ready()
                                 or not more or len(pending) > 8 * window):
            pending.popleft()
            if waiting:
                in_flight -= 1
                head = head.get()
            yield head
            continue
        batch = next(batches, None)
        if batch is None:
            more = False
        elif in_flight < window:
            pending.append(pool.apply_async(_process, (batch,)))
            in_flight += 1
        else:
            pending.append(_process(batch))


def _process(batch: list[tuple]) -> dict:
    """Parse, clean, sign and chunk a :func:`raw_batches` batch (runs in a worker process).

    Returns the batch in a form that is cheap to send back: ``docs``, one
    ``(where, source, lang, reason, key, minhash, samples)`` per record;
    ``tokens``, the samples of every kept document concatenated; ``sizes``,
    their lengths; ``stats``, one :meth:`chunking.ChunkStats.row` per record.
    """
    chunker: chunking.Chunker = _worker["chunker"]
    docs, texts = [], []
    for record in records(batch):
        doc, reason = to_document(*record)
        if doc is None:
            docs.append([record[0], record[1], None, reason, None, None, 0])
            continue
        text = normalize(doc.text, doc.lang)
        reason = quality_reason(text, doc.lang)
        key = values = None
        if reason is None:
            if _worker["dedup"]:
                key, values = exact_key(text), minhash_values(text)
            texts.append(split_sentences(text, doc.lang))
        docs.append([doc.where, doc.source, doc.lang, reason, key, values, 0])
    flats, sizes = [], []
    stats = np.zeros((len(docs), len(chunking.ChunkStats.counts())), dtype=np.int64)
    it = iter(chunker.tokenize(texts))      # one tokenizer call for the batch
    for i, d in enumerate(docs):
        if d[2] is not None and d[3] is None:
            flat, size, st = chunker.pack_flat(*next(it))
            flats.append(flat)
            sizes.append(size)
            stats[i] = st.row()
            d[6] = len(size)
    # ids < the vocabulary size, which the token dtype holds (token_dtype)
    dtype = _worker["dtype"]
    return {"docs": docs, "stats": stats,
            "tokens": np.concatenate(flats).astype(dtype) if flats else np.zeros(0, dtype),
            "sizes": np.concatenate(sizes) if sizes else np.zeros(0, np.int64)}


# ------------------------------------------------------------------- mixing

def blend_index(counts: dict[str, int], weights: dict[str, float], num_samples: int,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A deterministic blended order over sources, like Megatron's ``BlendedDataset``.

    Returns ``(dataset_index, sample_index, names)``: position ``i`` of the
    blend is sample ``sample_index[i]`` of source ``names[dataset_index[i]]``.
    Each source gets its weight's share of ``num_samples`` (largest remainder,
    so within one sample of exact), spread evenly through the order so every
    prefix is mixed as well; a source drawn more often than it has samples is
    repeated (a new seeded shuffle per epoch), one drawn less is subsampled.
    """
    names = [k for k in counts if counts[k] > 0 and weights.get(k, 0) > 0]
    if not names:
        raise CorpusError(f"nothing to blend: sources {dict(counts)} with weights {weights}")
    if num_samples < 1:
        raise CorpusError(f"num_samples must be positive, got {num_samples}")
    w = np.array([weights[k] for k in names], dtype=np.float64)
    w /= w.sum()
    exact = w * num_samples
    take = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - take), kind="stable")[:num_samples - take.sum()]:
        take[k] += 1
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in take])
    which = np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(take)])
    order = np.lexsort((which, times))
    dataset_index = which[order]
    sample_index = np.empty(num_samples, dtype=np.int64)
    for d, name in enumerate(names):
        n, have = int(take[d]), counts[name]
        draws = np.concatenate([
            np.random.default_rng([seed, d, epoch]).permutation(have)
            for epoch in range(math.ceil(n / have))])[:n] if n else np.zeros(0, np.int64)
        sample_index[dataset_index == d] = draws
    return dataset_index, sample_index, names


def resolve_weights(weights, groups: Iterable[str]) -> dict[str, float]:
    """``None`` = KnowLM's zh/en/code mix; ``"natural"`` = as found; else a mapping."""
    groups = list(groups)
    if weights == "natural":
        return {}
    if weights is None:
        weights = KNOWLM_WEIGHTS
    if not isinstance(weights, dict):
        raise CorpusError(f"weights must be a mapping, None or 'natural', got {weights!r}")
    bad = {k: v for k, v in weights.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or not math.isfinite(v)}
    if bad:
        raise CorpusError(f"weights must be non-negative numbers, got {bad}")
    missing = [g for g in groups if g not in weights]
    if missing:
        raise CorpusError(f"no weight for language(s) {missing} found in the corpus; "
                          f"weights cover {sorted(weights)} (use weights='natural' to keep "
                          f"the corpus proportions)")
    return {k: float(weights[k]) for k in groups}


# ------------------------------------------------------------------ prepare

def prepare(inputs, tokenizer_dir, max_len: int, out_prefix, num_proc: int | None = None,
            min_len: int = 0, weights=None, strict: bool = False, progress: bool = True,
            mode: str = "greedy", dedup: bool = True, num_samples: int | None = None,
            seed: int = 0, batch_docs: int = 32) -> dict:
    """Build ``out_prefix.bin`` / ``.idx`` / ``.stats.json`` from ``inputs`` (globs).

    Returns the stats (also written to ``out_prefix.stats.json``): documents in
    / out / dropped by reason per source, unreadable lines with ``file:line``,
    chunking counts, and the mix (target and realized shares per language).
    ``weights``: ``None`` for KnowLM's zh/en/code proportions, ``"natural"``
    for the corpus' own, or ``{"zh": .., "en": .., "code": ..}``.
    ``num_samples`` of the blend defaults to the number of samples packed.
    ``num_proc`` worker processes (default: the cores this process may use).
    """
    t0 = time.time()
    chunking.check_max_len(max_len, min_len)
    if num_proc is None:
        num_proc = cores()
    if not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1:
        raise CorpusError(f"num_proc must be a positive int, got {num_proc!r}")
    found = input_files(inputs)
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CorpusError(f"no fast tokenizer (tokenizer.json) in {tokenizer_dir}")
    vocab = len(chunking.TokenizerFiles(tokenizer_dir))
    dtype = indexed_dataset.token_dtype(vocab)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, dict):
        resolve_weights(weights, [])  # check the values before the long part

    problems = ReadReport()
    counts = _Counts()
    samples_col = chunking.ChunkStats.counts().index("samples")
    # every kept document in reading order (one dataset; its language in doc_lang),
    # blended into the output at the end
    parts = Path(tempfile.mkdtemp(dir=out_prefix.parent,
                                  prefix=f".{out_prefix.name}.parts-")) / "documents"
    writer = None
    deduper = Deduper() if dedup else None
    init = (str(tokenizer_dir), max_len, mode, min_len, dedup, np.dtype(dtype).name)
    pool = None
    # with workers, every process tokenizes on one thread (no pool of threads each)
    with chunking.one_tokenizer_thread(num_proc > 1):
        try:
            batches = raw_batches(found, batch_docs)
            if num_proc > 1:
                # num_proc - 1 workers, and this process works too while it waits
                pool = multiprocessing.get_context(_START).Pool(num_proc - 1, _init_worker, init)
            _init_worker(*init)
            results = _in_order(batches, pool, num_proc - 1)
            bar = _progress(progress)
            writer = indexed_dataset.IndexedDatasetWriter(parts, dtype)
            for batch in results:
                _collect(batch, writer, counts, problems, deduper, strict)
                if bar is not None:
                    bar.update(sum(d[2] is not None or d[3] is not None for d in batch["docs"]))
                    bar.set_postfix(samples=int(counts.chunking[samples_col]), refresh=False)
            if bar is not None:
                bar.close()
            writer.close()
            if not counts.doc_lang:
                raise CorpusError(
                    f"empty corpus: no document of {len(found)} file(s) survived reading, cleaning "
                    f"and deduplication ({_drop_summary(counts.sources) or 'no documents at all'})")
            blend = _write_blend(parts, counts.doc_lang, out_prefix, weights, num_samples, seed)
        finally:
            if pool is not None:
                pool.terminate()
            if writer is not None:
                writer.abort()                 # a no-op for a writer already closed
            shutil.rmtree(parts.parent, ignore_errors=True)

    stats = {
        "output": str(out_prefix),
        "files": [str(f) for f in found],
        "tokenizer": str(tokenizer_dir),
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "max_len": max_len, "min_len": min_len, "mode": mode, "dedup": dedup,
        "num_proc": num_proc,
        "sources": {k: _source_row(c) for k, c in sorted(counts.sources.items())},
        "unreadable": dict(problems.counts),
        "unreadable_lines": problems.examples,
        "chunking": counts.chunk_stats().summary(max_len),
        "groups": {k: dict(v) for k, v in sorted(counts.groups.items())},
        "blend": blend,
        "samples": blend["num_samples"],
        "tokens": blend["tokens"],
        "seconds": round(time.time() - t0, 2),
    }
    files.write_json(Path(str(out_prefix) + ".stats.json"), stats)
    return stats


class _Counts:
    """What ``prepare`` counts while it collects the workers' batches."""

    def __init__(self):
        self.sources: dict[str, Counter] = defaultdict(Counter)   # in / out / dropped:REASON
        self.groups: dict[str, Counter] = defaultdict(Counter)    # per language
        self.chunking = np.zeros(len(chunking.ChunkStats.counts()), dtype=np.int64)
        self.doc_lang: list[str] = []                              # per kept document

    def chunk_stats(self) -> chunking.ChunkStats:
        st = chunking.ChunkStats()
        st.add_row(self.chunking)
        return st


def _collect(batch: dict, writer, counts: _Counts, problems: ReadReport, deduper, strict: bool):
    """Count one batch from :func:`_process` and write its kept documents (one write)."""
    docs = batch["docs"]
    keep = np.zeros(len(docs), dtype=bool)       # written
    counted = np.zeros(len(docs), dtype=bool)    # in the chunking figures
    for i, (where, source, lang, reason, key, values, n) in enumerate(docs):
        if lang is None and reason is None:      # a blank line
            continue
        src = counts.sources[source]
        src["in"] += 1
        if lang is None:                         # unreadable
            if strict:
                raise _unreadable(where, reason)
            problems.add(where, source, reason)
        elif reason is None and deduper is not None:
            reason = deduper.check(key, values)
        if lang is not None and reason is None and not n:
            reason = "no_samples_left"           # every sample shorter than min_len
            counted[i] = True
        if reason:
            src["dropped:" + reason] += 1
            continue
        src["out"] += 1
        keep[i] = counted[i] = True
        counts.doc_lang.append(lang)
    counts.chunking += batch["stats"][counted].sum(axis=0)
    if not keep.any():
        return
    per_doc = np.array([d[6] for d in docs], dtype=np.int64)     # samples of each document
    tokens, sizes = batch["tokens"], batch["sizes"]
    if not keep.all():
        take = np.repeat(keep, per_doc)
        tokens, sizes = tokens[np.repeat(take, sizes)], sizes[take]
    n_kept = per_doc[keep]
    starts = np.cumsum(n_kept) - n_kept                             # of each kept document
    writer.add_sequences(tokens, sizes, new_documents=starts)
    writer.end_document()
    doc_tokens = np.add.reduceat(sizes, starts).tolist()
    for lang, n, t in zip((d[2] for d, k in zip(docs, keep) if k), n_kept.tolist(), doc_tokens):
        g = counts.groups[lang]
        g["documents"] += 1
        g["samples"] += n
        g["tokens"] += t


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        return os.cpu_count() or 1


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(unit="doc", desc="prepare")


def _source_row(c: Counter) -> dict:
    dropped = {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("dropped:")}
    return {"in": c["in"], "out": c["out"], "dropped": dropped}


def _drop_summary(sources) -> str:
    total = Counter()
    for c in sources.values():
        total.update({k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("dropped:")})
    return ", ".join(f"{k}: {v}" for k, v in total.most_common())


def _write_blend(parts: Path, doc_lang: list[str], out_prefix: Path, weights, num_samples,
                 seed, chunk_tokens: int = 1 << 18) -> dict:
    """Write the blended output from ``parts`` (every kept document, in reading
    order; ``doc_lang[d]`` is document ``d``'s language); return the mix figures.

    Vectorized: about ``chunk_tokens`` tokens at a time are gathered from the
    memory-mapped parts with one fancy index and written with one call, so
    memory holds a few bytes per sample and ``chunk_tokens`` tokens, never the corpus.
    """
    data = indexed_dataset.IndexedDataset(parts)
    langs, code_of_doc = np.unique(np.array(doc_lang), return_inverse=True)
    code_of = np.repeat(code_of_doc.astype(np.int8), np.diff(data.doc_idx))    # per sample
    members = {str(g): np.flatnonzero(code_of == k) for k, g in enumerate(langs)}
    del code_of
    counts = {g: len(m) for g, m in members.items()}
    w = resolve_weights(weights, counts) or {g: float(n) for g, n in counts.items()}
    n_total = num_samples if num_samples is not None else sum(counts.values())
    dataset_index, sample_index, names = blend_index(counts, w, n_total, seed)
    # the blend as sample numbers of the parts
    picked = np.empty(n_total, dtype=np.int64)
    for d, g in enumerate(names):
        at = dataset_index == d
        picked[at] = members[g][sample_index[at]]
    del members, sample_index
    sizes = data.sizes[picked].astype(np.int64)
    ends = np.cumsum(sizes)
    starts = data.pointers // data.tokens.itemsize
    bounds = np.searchsorted(ends, np.arange(chunk_tokens, int(ends[-1]), chunk_tokens))
    with indexed_dataset.IndexedDatasetWriter(out_prefix, data.tokens.dtype) as out:
        prev_doc = -1
        for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n_total]])):
            if a == b:
                continue
            ids, n = picked[a:b], sizes[a:b]
            # token positions: each sample's start, then +1 along the sample
            offsets = np.cumsum(n) - n
            where = np.repeat(starts[ids] - offsets, n) + np.arange(int(n.sum()))
            docs = np.searchsorted(data.doc_idx, ids, side="right") - 1
            new = np.flatnonzero(np.diff(docs, prepend=prev_doc) != 0)
            out.add_sequences(data.tokens[where], n, new_documents=new)
            prev_doc = int(docs[-1])
    tokens = {g: int(sizes[dataset_index == d].sum()) for d, g in enumerate(names)}
    drawn = {g: int(n) for g, n in zip(names, np.bincount(dataset_index, minlength=len(names)))
             if n}
    total_w = sum(w[g] for g in names)
    return {
        "weights": {g: w[g] for g in names},
        "target": {g: round(w[g] / total_w, 6) for g in names},
        "realized": {g: round(drawn.get(g, 0) / n_total, 6) for g in names},
        "realized_tokens": {g: round(tokens[g] / sum(tokens.values()), 6) for g in names},
        "available": counts,
        "drawn": drawn,
        "epochs": {g: round(drawn.get(g, 0) / counts[g], 3) for g in names},
        "num_samples": n_total,
        "tokens": sum(tokens.values()),
    }


# ---------------------------------------------------------------------- CLI

def _parse_weights(text: str | None):
    if text is None or text == "knowlm":
        return None
    if text == "natural":
        return "natural"
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CorpusError(f"--weights takes NAME=NUMBER,..., 'natural' or 'knowlm'; "
                              f"got {text!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.corpus",
                                 description="Prepare a pretraining corpus.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="clean, dedup, split, pack and write PREFIX.bin/.idx")
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="JSONL or plain-text files (globs, relative to the repo root or absolute)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face fast tokenizer folder")
    p.add_argument("--max-len", type=int, required=True, help="tokens per sample, BOS/EOS included")
    p.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin, .idx, .stats.json)")
    p.add_argument("--num-proc", type=int, default=None,
                   help="worker processes (default: the machine's cores)")
    p.add_argument("--min-len", type=int, default=0, help="drop samples shorter than this (counted)")
    p.add_argument("--weights", default=None,
                   help="mix: 'knowlm' (default, zh 5.5 : en 1.5 : code 0.9), 'natural', "
                        "or e.g. zh=1,en=1,code=0.5")
    p.add_argument("--num-samples", type=int, default=None, help="size of the blend")
    p.add_argument("--mode", choices=chunking.MODES, default="greedy")
    p.add_argument("--no-dedup", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        stats = prepare(args.input, args.tokenizer, args.max_len, args.out,
                        num_proc=args.num_proc, min_len=args.min_len,
                        weights=_parse_weights(args.weights), strict=args.strict,
                        progress=not args.quiet, mode=args.mode, dedup=not args.no_dedup,
                        num_samples=args.num_samples, seed=args.seed)
    except (CorpusError, chunking.ChunkError, indexed_dataset.IndexedDatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    short = {k: stats[k] for k in ("output", "samples", "tokens", "seconds")}
    short["mean_fill"] = stats["chunking"]["mean_fill"]
    short["realized"] = stats["blend"]["realized"]
    print(json.dumps(short, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
