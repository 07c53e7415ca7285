"""The Megatron-LM indexed dataset: ``PREFIX.bin`` (tokens) + ``PREFIX.idx`` (index).

This is the ``MMIDIDX`` format megatron-core's ``IndexedDataset`` reads, so a
dataset written here trains with Megatron-LM as well as with our own
:class:`SampleDataset`. The ``.idx`` file, all little-endian::

    offset  size        field
    0       9           magic  b"MMIDIDX\\x00\\x00"
    9       8  <Q       version (1)
    17      1  <B       dtype code of the tokens in .bin (4 = int32, 8 = uint16, ...)
    18      8  <Q       sequence count  S
    26      8  <Q       document count  D  (= documents + 1: doc_idx starts with 0)
    34      4*S int32   sequence lengths (tokens)
    ..      8*S int64   sequence pointers (byte offset of each sequence in .bin)
    ..      8*D int64   doc_idx: index of the first sequence of each document, then S

``PREFIX.bin`` is just the token ids of every sequence, back to back.
Tokens are ``uint16`` when the vocabulary fits (Megatron's rule: fewer than
65,500 ids), ``int32`` otherwise.

KnowLM's original wrote a headerless ``.idx`` of its own (uint64 start, uint16
length) that no other tool reads; this one is the ecosystem's format.

Writes are atomic (:class:`knowlm_nb.files.AtomicFile`): both files are
written under scratch names and renamed into place only when complete, with
the permissions the umask asks for. Opening a missing, truncated or inconsistent
dataset raises :class:`IndexedDatasetError` saying what is wrong.
"""
from __future__ import annotations

import struct
from array import array
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import files

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 sequences + 8 documents

# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
UINT16_LIMIT = 65500  # Megatron's DType.optimal_dtype threshold


class IndexedDatasetError(ValueError):
    """A missing, truncated or corrupt indexed dataset; the message says which file and why."""


def token_dtype(vocab_size: int) -> type:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits, else ``int32``."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise IndexedDatasetError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return np.uint16 if vocab_size < UINT16_LIMIT else np.int32


def paths(prefix) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)``."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def exists(prefix) -> bool:
    b, i = paths(prefix)
    return b.is_file() and i.is_file()


# ------------------------------------------------------------------- writing

def index_bytes(sizes: Sequence[int], doc_idx: Sequence[int], dtype) -> bytes:
    """The complete ``.idx`` content for sequences of ``sizes`` tokens of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF:
        raise IndexedDatasetError(f"unsupported token dtype {dtype}")
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    head = (MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[dtype])
            + struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
    return head + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes()


class IndexedDatasetWriter:
    """Stream sequences into ``PREFIX.bin`` / ``PREFIX.idx``; atomic on ``close``.

    ::

        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_sequence([1, 5, 9]); w.add_sequence([1, 7]); w.end_document()

    Memory holds only the index (4 + 8 bytes per sequence), never the tokens.
    If the block raises, nothing is left behind and an existing dataset at
    ``prefix`` is untouched.
    """

    def __init__(self, prefix, dtype=np.int32):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise IndexedDatasetError(f"unsupported token dtype {self.dtype}")
        self._max = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self.sizes = array("i")
        self.doc_idx = array("q", [0])
        self._bin = files.AtomicFile(paths(self.prefix)[0], "wb")
        self.closed = False           # True once committed (close) or discarded (abort)

    def add_sequence(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1 or len(arr) == 0:
            raise IndexedDatasetError(f"a sequence must be a non-empty 1-D list of ids, "
                                      f"got shape {arr.shape}")
        self.add_tokens(arr)
        self.sizes.append(len(arr))

    def add_sequences(self, tokens: np.ndarray, sizes, new_documents=()) -> None:
        """Many sequences in one write: ``tokens`` concatenated, ``sizes`` their lengths.

        ``new_documents``: positions in ``sizes`` where a document begins (as if
        :meth:`end_document` were called before that sequence).
        """
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.ndim != 1 or (sizes < 1).any() or int(sizes.sum()) != len(tokens):
            raise IndexedDatasetError(f"sizes must be positive and add up to the {len(tokens)} "
                                      f"tokens given, got {sizes.sum()} in {len(sizes)} sizes")
        self.add_tokens(tokens)
        base = len(self.sizes)
        self.sizes.extend(sizes.tolist())
        starts = base + np.asarray(new_documents, dtype=np.int64)
        self.doc_idx.extend(starts[starts > self.doc_idx[-1]].tolist())

    def add_tokens(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype and arr.size and self._max is not None and (
                arr.min() < 0 or arr.max() > self._max):
            raise IndexedDatasetError(f"token id out of range for {self.dtype}: "
                                      f"min {arr.min()}, max {arr.max()}")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).data)

    def end_document(self) -> None:
        """Mark the sequences added since the last call as one document."""
        if len(self.sizes) > self.doc_idx[-1]:
            self.doc_idx.append(len(self.sizes))

    def close(self) -> None:
        """Write the index and move both files into place (a no-op once closed)."""
        if self.closed:
            return
        self.end_document()
        bin_path, idx_path = paths(self.prefix)
        try:
            idx_path.unlink(missing_ok=True)  # never a new .bin next to an old .idx
            self._bin.commit()
            files.write_bytes(idx_path, index_bytes(self.sizes, self.doc_idx, self.dtype))
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def abort(self) -> None:
        """Discard everything written so far (a no-op once closed)."""
        if not self.closed:
            self._bin.abort()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write(prefix, documents: Iterable[Iterable[Sequence[int]]], dtype=np.int32) -> Path:
    """Write ``documents`` (each an iterable of sequences of ids); return ``prefix``."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()
    return Path(prefix)


# ------------------------------------------------------------------- reading

def read_index(idx_path) -> dict:
    """Parse and check a ``.idx`` file; return its fields (arrays are read-only views)."""
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise IndexedDatasetError(f"index file not found: {idx_path}")
    size = idx_path.stat().st_size
    if size < HEADER_SIZE:
        raise IndexedDatasetError(f"{idx_path}: truncated: {size} bytes, shorter than the "
                                  f"{HEADER_SIZE}-byte header")
    buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
    head = bytes(buf[:HEADER_SIZE])
    if head[:9] != MAGIC:
        raise IndexedDatasetError(f"{idx_path}: not a Megatron indexed dataset: magic is "
                                  f"{head[:9]!r}, expected {MAGIC!r}")
    version, = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported version {version}, expected {VERSION}")
    code = head[17]
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    expect = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size < expect:
        raise IndexedDatasetError(f"{idx_path}: truncated: {size} bytes, the header announces "
                                  f"{n_seq} sequences and {n_doc} document indices ({expect} bytes)")
    if size > expect:
        raise IndexedDatasetError(f"{idx_path}: {size - expect} unexpected trailing bytes after "
                                  f"{n_seq} sequences and {n_doc} document indices")
    off = HEADER_SIZE
    sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
    off += 4 * n_seq
    pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
    off += 8 * n_seq
    doc_idx = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)
    dtype = np.dtype(DTYPE_CODES[code])
    if n_seq and sizes.min() < 0:
        raise IndexedDatasetError(f"{idx_path}: corrupt: negative sequence length")
    want = np.zeros(n_seq, dtype=np.int64)
    if n_seq > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=want[1:])
    if not np.array_equal(pointers, want):
        bad = int(np.flatnonzero(pointers != want)[0])
        raise IndexedDatasetError(f"{idx_path}: corrupt: pointer of sequence {bad} is "
                                  f"{pointers[bad]}, lengths say {want[bad]}")
    if n_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise IndexedDatasetError(f"{idx_path}: corrupt: document indices must rise from 0 "
                                  f"to the sequence count {n_seq}")
    return {"dtype": dtype, "sizes": sizes, "pointers": pointers, "doc_idx": doc_idx,
            "tokens": int(sizes.sum(dtype=np.int64))}


class IndexedDataset:
    """Memory-mapped random access to a ``PREFIX.bin`` / ``PREFIX.idx`` pair.

    ``len(ds)`` sequences; ``ds[i]`` is a 1-D numpy array of token ids (a view
    into the mapped file; copy it to modify); ``ds.sizes`` the lengths,
    ``ds.doc_idx`` the document boundaries, ``ds.dtype`` the token type.
    """

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        bin_path, idx_path = paths(prefix)
        if not bin_path.is_file() and not idx_path.is_file():
            raise IndexedDatasetError(f"no indexed dataset at {prefix} "
                                      f"(neither {bin_path.name} nor {idx_path.name} exists)")
        if not bin_path.is_file():
            raise IndexedDatasetError(f"data file not found: {bin_path}")
        index = read_index(idx_path)
        self.dtype = index["dtype"]
        self.sizes: np.ndarray = index["sizes"]
        self.pointers: np.ndarray = index["pointers"]
        self.doc_idx: np.ndarray = index["doc_idx"]
        self.num_tokens: int = index["tokens"]
        have = bin_path.stat().st_size
        want = self.num_tokens * self.dtype.itemsize
        if have != want:
            raise IndexedDatasetError(
                f"{bin_path}: {'truncated' if have < want else 'too long'}: {have} bytes, "
                f"the index describes {self.num_tokens} tokens of {self.dtype} ({want} bytes)")
        #: every token of the file, memory-mapped (sequence ``i`` is
        #: ``tokens[pointers[i] // itemsize:][:sizes[i]]``)
        self.tokens = (np.memmap(bin_path, mode="r", dtype=self.dtype) if want
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        start = self.pointers[i] // self.dtype.itemsize
        return self.tokens[start:start + self.sizes[i]]

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document ``d``."""
        return [self[i] for i in range(int(self.doc_idx[d]), int(self.doc_idx[d + 1]))]

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}: {len(self)} sequences, {self.num_docs} "
                f"documents, {self.num_tokens} tokens of {self.dtype})")


def __getattr__(name):
    # SampleDataset subclasses torch's Dataset; it is made on first use so that
    # readers and writers (and corpus' worker processes) never import torch
    if name == "SampleDataset":
        globals()[name] = _sample_dataset_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sample_dataset_class():
    import torch.utils.data

    class SampleDataset(torch.utils.data.Dataset):
        """Fixed-length training samples from an indexed dataset (a torch ``Dataset``).

        Item ``i`` is a dict of LongTensors of length ``seq_len``: ``input_ids``
        (sequence ``i`` then ``pad_id``), ``attention_mask`` (1 on tokens, 0 on
        padding) and ``labels`` (the ids, ``-100`` on padding so the loss ignores it).
        Every stored sequence must fit: a longer one is an error, not a silent cut.
        """

        def __init__(self, prefix, seq_len: int, pad_id: int):
            if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
                raise IndexedDatasetError(f"seq_len must be a positive int, got {seq_len!r}")
            if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
                raise IndexedDatasetError(f"pad_id must be a non-negative int, got {pad_id!r}")
            self.data = IndexedDataset(prefix)
            self.seq_len, self.pad_id = seq_len, int(pad_id)
            if len(self.data) == 0:
                raise IndexedDatasetError(f"{prefix}: the dataset holds no sequences")
            longest = int(self.data.sizes.max())
            if longest > seq_len:
                at = int(np.argmax(self.data.sizes))
                raise IndexedDatasetError(
                    f"{prefix}: sequence {at} has {longest} tokens, longer than seq_len={seq_len}; "
                    f"rebuild the dataset with max_len <= {seq_len} or raise seq_len")

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> dict:
            import torch

            ids = self.data[i]
            n = len(ids)
            input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
            input_ids[:n] = torch.from_numpy(ids.astype(np.int64))
            attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
            attention_mask[:n] = 1
            labels = input_ids.clone()
            labels[n:] = -100
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    SampleDataset.__qualname__ = "SampleDataset"   # picklable by its module-level name
    return SampleDataset
