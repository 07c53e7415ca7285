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
   brackets stay with their sentence), English with pysbd (rule-based:
   abbreviations, decimals, initials), code between lines at blank lines and
   top-level blocks;
5. **pack** with :mod:`knowlm_nb.chunking` (batched tokenization, ``num_proc``
   worker processes over documents);
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
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import chunking, indexed_dataset, report, tiny

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
    files: list[Path] = []
    for pattern in inputs:
        try:
            found = tiny.corpus_files(str(pattern))
        except tiny.ZooError:
            raise CorpusError(f"no files match {pattern!r}") from None
        files.extend(f for f in found if f not in files)
    return files


def guess_lang(text: str, path: Path | None = None) -> str:
    """``code`` for source files, ``zh`` when CJK characters dominate, else ``en``."""
    if path is not None and path.suffix in CODE_SUFFIXES:
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


def iter_documents(files: Iterable[Path], strict: bool = False,
                   problems: ReadReport | None = None) -> Iterator[Document]:
    """Stream documents from JSONL and plain-text files, one at a time.

    Unreadable lines are skipped and recorded in ``problems`` (or, with
    ``strict``, raise :class:`CorpusError` naming ``file:line`` and why).
    """
    problems = problems if problems is not None else ReadReport()
    for path in files:
        path = Path(path)
        if path.suffix not in JSONL_SUFFIXES:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if strict:
                    raise CorpusError(f"{path}: invalid UTF-8 ({exc.reason})") from None
                problems.add(str(path), path.stem, "invalid_utf8")
                continue
            yield Document(text, guess_lang(text, path), path.stem, str(path))
            continue
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                rec, reason = _parse_line(raw)
                where = f"{path}:{lineno}"
                if reason:
                    if strict:
                        raise CorpusError(f"{where}: {reason.replace('_', ' ')}")
                    problems.add(where, path.stem, reason)
                    continue
                if rec is None:
                    continue
                source = path.stem    # per input file: a record's "source" is often a licence tag
                lang = rec.get("lang") if isinstance(rec.get("lang"), str) else None
                yield Document(rec["text"], lang or guess_lang(rec["text"], path), source, where)


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

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")


@dataclass
class Filters:
    """Simple quality filters; a document failing one is dropped with that reason."""
    min_chars: int = 20            # too_short
    min_text_ratio: float = 0.5    # low_text_ratio: letters (any script) / non-space chars
    max_dup_line_ratio: float = 0.5  # repetitive: repeated non-blank lines / lines


def normalize(text: str, lang: str) -> str:
    """NFC, unified line ends, control characters removed (tabs kept in code),
    trailing spaces and runs of blank lines trimmed in prose."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if lang == "code":
        return _CONTROL.sub("", text).strip("\n")
    text = _CONTROL_TEXT.sub("", text).replace("\t", " ")
    text = re.sub(r"[ \u3000]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def quality_reason(text: str, lang: str, filters: Filters = Filters()) -> str | None:
    """Why a cleaned document should be dropped, or ``None`` to keep it."""
    if len(text) < filters.min_chars:
        return "too_short"
    if lang != "code":
        visible = [ch for ch in text[:20000] if not ch.isspace()]
        letters = sum(ch.isalpha() for ch in visible)
        if visible and letters / len(visible) < filters.min_text_ratio:
            return "low_text_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) >= 4:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > filters.max_dup_line_ratio:
            return "repetitive"
    return None


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
_PYSBD_WINDOW = 10_000
_CODE_BLOCK = re.compile(r"(async\s+def|def|class|function|fn|func|public|private|"
                         r"static|struct|impl|interface|#include|@)\b|@")
_pysbd = None


def split_zh(text: str) -> list[str]:
    """Chinese: after 。！？；… (and ASCII !?;) or line breaks; closing quotes and
    brackets stay with their sentence."""
    return [m.group(0) for m in _ZH_SENT.finditer(text) if m.group(0)]


def split_en(text: str) -> list[str]:
    """English with pysbd (rule-based, offline), paragraph by paragraph.

    Whitespace between sentences starts the next sentence (as the tokenizer
    sees it in running text); line breaks end the sentence before them.
    """
    global _pysbd
    out: list[str] = []
    for para in re.findall(r"[^\n]*\n*", text):
        if not para:
            continue
        if not _EN_END.search(para):
            out.append(para)
            continue
        if _pysbd is None:
            import pysbd
            _pysbd = pysbd.Segmenter(language="en", clean=False)
        ends = []
        for w0 in range(0, len(para), _PYSBD_WINDOW):      # windows keep hostile lines linear
            window = para[w0:w0 + _PYSBD_WINDOW]
            pos = 0
            for seg in _pysbd.segment(window):
                seg = seg.strip()
                at = window.find(seg, pos) if seg else -1
                if at < 0:          # pysbd changed the text: no boundary here
                    continue
                pos = at + len(seg)
                ends.append(w0 + pos)
        # a sentence ends after its last visible character; the space that
        # follows starts the next one, trailing line breaks stay with the last
        bounds = sorted({e for e in ends if para[e:].strip()})
        out.extend(para[a:b] for a, b in zip([0] + bounds, bounds + [len(para)]))
    return [s for s in out if s]


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


def _init_worker(tokenizer_dir: str, max_len: int, mode: str, min_len: int, dedup: bool):
    from transformers import AutoTokenizer

    from . import preflight  # a wrong local path: the project's 'not found'
    tok = AutoTokenizer.from_pretrained(
        preflight.require(tokenizer_dir, "tokenizer"), local_files_only=True)
    _worker.update(chunker=chunking.Chunker(tok, max_len, mode=mode, min_len=min_len),
                   dedup=dedup)


def _process(batch: list[Document]) -> list[dict]:
    """Clean, sign and chunk a batch of documents (runs in a worker process)."""
    chunker: chunking.Chunker = _worker["chunker"]
    results, texts = [], []
    for doc in batch:
        text = normalize(doc.text, doc.lang)
        reason = quality_reason(text, doc.lang)
        r = {"source": doc.source, "lang": doc.lang, "where": doc.where, "reason": reason}
        if reason is None:
            if _worker["dedup"]:
                r["key"], r["minhash"] = exact_key(text), minhash_values(text)
            texts.append(split_sentences(text, doc.lang))
        results.append(r)
    tokenized = chunker.tokenize(texts)
    it = iter(tokenized)
    for r in results:
        if r["reason"] is None:
            r["samples"], r["stats"] = chunker.pack(next(it))
    return results


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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

def prepare(inputs, tokenizer_dir, max_len: int, out_prefix, num_proc: int = 1,
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
    """
    t0 = time.time()
    chunking.check_max_len(max_len, min_len)
    if not isinstance(num_proc, int) or num_proc < 1:
        raise CorpusError(f"num_proc must be a positive int, got {num_proc!r}")
    files = input_files(inputs)
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CorpusError(f"no fast tokenizer (tokenizer.json) in {tokenizer_dir}")
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    dtype = indexed_dataset.token_dtype(vocab)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, dict):
        resolve_weights(weights, [])  # check the values before the long part

    problems = ReadReport()
    sources: dict[str, Counter] = defaultdict(Counter)
    chunk_stats = chunking.ChunkStats()
    group_stats: dict[str, Counter] = defaultdict(Counter)
    parts = Path(tempfile.mkdtemp(dir=out_prefix.parent, prefix=f".{out_prefix.name}.parts-"))
    writers: dict[str, indexed_dataset.IndexedDatasetWriter] = {}
    deduper = Deduper() if dedup else None
    init = (str(tokenizer_dir), max_len, mode, min_len, dedup)
    pool = None
    try:
        batches = _batches(iter_documents(files, strict=strict, problems=problems), batch_docs)
        if num_proc > 1:
            pool = multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, init)
            results = pool.imap(_process, batches)
        else:
            _init_worker(*init)
            results = map(_process, batches)
        bar = _progress(progress)
        for batch in results:
            for r in batch:
                src = sources[r["source"]]
                src["in"] += 1
                reason = r["reason"]
                if reason is None and deduper is not None:
                    reason = deduper.check(r["key"], r["minhash"])
                if reason is None and not r["samples"]:
                    reason = "no_samples_left"     # every sample shorter than min_len
                    chunk_stats.add(r["stats"])
                if reason:
                    src["dropped:" + reason] += 1
                    continue
                src["out"] += 1
                chunk_stats.add(r["stats"])
                lang = r["lang"]
                if lang not in writers:
                    writers[lang] = indexed_dataset.IndexedDatasetWriter(parts / lang, dtype)
                for s in r["samples"]:
                    writers[lang].add_sequence(s)
                writers[lang].end_document()
                g = group_stats[lang]
                g["documents"] += 1
                g["samples"] += len(r["samples"])
                g["tokens"] += sum(len(s) for s in r["samples"])
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(samples=chunk_stats.samples, refresh=False)
        if bar is not None:
            bar.close()
        for src, c in problems.per_source.items():
            for reason, n in c.items():
                sources[src]["in"] += n
                sources[src]["dropped:" + reason] += n
        for w in writers.values():
            w.close()
        if not writers:
            raise CorpusError(
                f"empty corpus: no document of {len(files)} file(s) survived reading, cleaning "
                f"and deduplication ({_drop_summary(sources) or 'no documents at all'})")
        blend = _write_blend(parts, out_prefix, dict(group_stats), weights, num_samples,
                             seed, dtype)
    finally:
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            w.abort() if not w._closed else None
        shutil.rmtree(parts, ignore_errors=True)

    stats = {
        "output": str(out_prefix),
        "files": [str(f) for f in files],
        "tokenizer": str(tokenizer_dir),
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "max_len": max_len, "min_len": min_len, "mode": mode, "dedup": dedup,
        "num_proc": num_proc,
        "sources": {k: _source_row(c) for k, c in sorted(sources.items())},
        "unreadable": dict(problems.counts),
        "unreadable_lines": problems.examples,
        "chunking": chunk_stats.summary(max_len),
        "groups": {k: dict(v) for k, v in sorted(group_stats.items())},
        "blend": blend,
        "samples": blend["num_samples"],
        "tokens": blend["tokens"],
        "seconds": round(time.time() - t0, 2),
    }
    report._atomic_write_json(Path(str(out_prefix) + ".stats.json"), stats)
    return stats


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


def _write_blend(parts: Path, out_prefix: Path, groups: dict, weights, num_samples, seed,
                 dtype) -> dict:
    """Write the blended output from the per-language parts; return the mix figures."""
    data = {g: indexed_dataset.IndexedDataset(parts / g) for g in sorted(groups)}
    counts = {g: len(ds) for g, ds in data.items()}
    w = resolve_weights(weights, counts) or {g: float(n) for g, n in counts.items()}
    n_total = num_samples if num_samples is not None else sum(counts.values())
    dataset_index, sample_index, names = blend_index(counts, w, n_total, seed)
    tokens = Counter()
    with indexed_dataset.IndexedDatasetWriter(out_prefix, dtype) as out:
        prev = None
        for d, s in zip(dataset_index.tolist(), sample_index.tolist()):
            ds = data[names[d]]
            doc = (d, int(np.searchsorted(ds.doc_idx, s, side="right")) - 1)
            if doc != prev:
                out.end_document()
                prev = doc
            seq = ds[s]
            out.add_sequence(seq)
            tokens[names[d]] += len(seq)
    drawn = Counter(names[d] for d in dataset_index.tolist())
    total_w = sum(w[g] for g in names)
    return {
        "weights": {g: w[g] for g in names},
        "target": {g: round(w[g] / total_w, 6) for g in names},
        "realized": {g: round(drawn[g] / n_total, 6) for g in names},
        "realized_tokens": {g: round(tokens[g] / sum(tokens.values()), 6) for g in names},
        "available": counts,
        "drawn": dict(drawn),
        "epochs": {g: round(drawn[g] / counts[g], 3) for g in names},
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
    p.add_argument("--num-proc", type=int, default=1)
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
