"""Megatron indexed dataset: round trip, byte layout, megatron-core reads it, bad files."""
import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from knowlm_nb import indexed_dataset as idx

DOCS = [[[1, 5, 9, 2]], [[1, 7, 7], [1, 8, 2]], [[1, 65499, 2]]]


def test_round_trip_small(tmp_path):
    idx.write(tmp_path / "d", DOCS, np.uint16)
    ds = idx.IndexedDataset(tmp_path / "d")
    assert len(ds) == 4 and ds.num_docs == 3 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(4)] == [s for d in DOCS for s in d]
    assert ds[-1].tolist() == [1, 65499, 2]
    assert ds.sizes.tolist() == [4, 3, 3, 3] and ds.doc_idx.tolist() == [0, 1, 3, 4]
    assert [s.tolist() for s in ds.document(1)] == DOCS[1]
    with pytest.raises(IndexError):
        ds[4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temp files left


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(st.lists(st.lists(st.integers(0, 70_000), min_size=1, max_size=20),
                              min_size=1, max_size=4), min_size=0, max_size=8))
def test_round_trip_property(tmp_path_factory, docs):
    dtype = idx.token_dtype(70_001)
    prefix = tmp_path_factory.mktemp("rt") / "d"
    idx.write(prefix, docs, dtype)
    ds = idx.IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [s for d in docs for s in d]
    assert ds.num_docs == len(docs)


def test_dtype_choice_follows_megatron():
    assert idx.token_dtype(2000) == np.uint16
    assert idx.token_dtype(65_499) == np.uint16
    assert idx.token_dtype(65_500) == np.int32
    assert idx.token_dtype(128_256) == np.int32


def test_idx_byte_layout(tmp_path):
    idx.write(tmp_path / "d", DOCS, np.uint16)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)          # version
    assert raw[17] == 8                                    # uint16 code
    assert struct.unpack("<QQ", raw[18:34]) == (4, 4)      # sequences, documents + 1
    assert np.frombuffer(raw, np.int32, 4, 34).tolist() == [4, 3, 3, 3]
    assert np.frombuffer(raw, np.int64, 4, 50).tolist() == [0, 8, 14, 20]  # byte pointers
    assert np.frombuffer(raw, np.int64, 4, 82).tolist() == [0, 1, 3, 4]
    assert len(raw) == 34 + 4 * 4 + 8 * 4 + 8 * 4
    data = (tmp_path / "d.bin").read_bytes()
    assert np.frombuffer(data, "<u2").tolist() == [t for d in DOCS for s in d for t in s]


def test_int32_tokens_for_large_vocabularies(tmp_path):
    idx.write(tmp_path / "d", [[[1, 100_000, 2]]], np.int32)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[17] == 4
    assert idx.IndexedDataset(tmp_path / "d")[0].tolist() == [1, 100_000, 2]


def test_megatron_core_reads_our_files(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    idx.write(tmp_path / "d", DOCS, np.uint16)
    m = MegatronIndexed(str(tmp_path / "d"))
    assert len(m) == 4
    assert [m[i].tolist() for i in range(4)] == [s for d in DOCS for s in d]
    assert m.document_indices.tolist() == [0, 1, 3, 4]
    assert m.sequence_lengths.tolist() == [4, 3, 3, 3]


def test_sample_dataset_pads_and_masks(tmp_path):
    idx.write(tmp_path / "d", DOCS, np.uint16)
    ds = idx.SampleDataset(tmp_path / "d", seq_len=5, pad_id=3)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 4
    item = ds[1]
    assert item["input_ids"].tolist() == [1, 7, 7, 3, 3]
    assert item["attention_mask"].tolist() == [1, 1, 1, 0, 0]
    assert item["labels"].tolist() == [1, 7, 7, -100, -100]
    assert all(v.dtype == torch.long and v.shape == (5,) for v in item.values())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == (4, 5)


def test_sample_dataset_rejects_too_long_and_missing(tmp_path):
    idx.write(tmp_path / "d", DOCS, np.uint16)
    with pytest.raises(idx.IndexedDatasetError, match="longer than seq_len=3"):
        idx.SampleDataset(tmp_path / "d", seq_len=3, pad_id=0)
    with pytest.raises(idx.IndexedDatasetError, match="no indexed dataset"):
        idx.SampleDataset(tmp_path / "nothing", seq_len=8, pad_id=0)
    with pytest.raises(idx.IndexedDatasetError, match="seq_len"):
        idx.SampleDataset(tmp_path / "d", seq_len=0, pad_id=0)


# ------------------------------------------------------------------ bad files

@pytest.fixture
def written(tmp_path):
    idx.write(tmp_path / "d", DOCS, np.uint16)
    return tmp_path / "d"


@pytest.mark.parametrize("cut", [0, 10, 33, 40, 100])
def test_truncated_idx_is_an_error(written, cut):
    path = written.with_suffix(".idx")
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(idx.IndexedDatasetError, match="truncated"):
        idx.IndexedDataset(written)


def test_truncated_bin_is_an_error(written):
    path = written.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(idx.IndexedDatasetError, match="truncated.*index describes 13 tokens"):
        idx.IndexedDataset(written)


@pytest.mark.parametrize("offset,value,message", [
    (0, b"XXIDIDX\x00\x00", "magic"),
    (9, struct.pack("<Q", 2), "version 2"),
    (17, bytes([99]), "dtype code 99"),
    (50 + 8, struct.pack("<q", 7), "pointer of sequence 1"),
    (82, struct.pack("<q", 1), "document indices"),
])
def test_corrupt_idx_says_what_is_wrong(written, offset, value, message):
    path = written.with_suffix(".idx")
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(value)] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(idx.IndexedDatasetError, match=message):
        idx.IndexedDataset(written)


def test_trailing_bytes_and_missing_files(written):
    path = written.with_suffix(".idx")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(idx.IndexedDatasetError, match="trailing"):
        idx.IndexedDataset(written)
    path.unlink()
    with pytest.raises(idx.IndexedDatasetError, match="index file not found"):
        idx.IndexedDataset(written)
    assert issubclass(idx.IndexedDatasetError, ValueError)


def test_failed_write_leaves_nothing_and_keeps_the_old_dataset(written):
    before = written.with_suffix(".bin").read_bytes()
    with pytest.raises(RuntimeError):
        with idx.IndexedDatasetWriter(written, np.uint16) as w:
            w.add_sequence([1, 2, 3])
            raise RuntimeError("interrupted")
    assert written.with_suffix(".bin").read_bytes() == before
    assert sorted(p.name for p in written.parent.iterdir()) == ["d.bin", "d.idx"]


def test_writer_rejects_bad_sequences(tmp_path):
    with idx.IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        with pytest.raises(idx.IndexedDatasetError, match="out of range"):
            w.add_sequence([1, 70_000])
        with pytest.raises(idx.IndexedDatasetError, match="non-empty"):
            w.add_sequence([])
        w.add_sequence([5])
    assert idx.IndexedDataset(tmp_path / "d")[0].tolist() == [5]


@settings(max_examples=50, deadline=None)
@given(docs=st.lists(st.lists(st.lists(st.integers(0, 60000), min_size=1, max_size=5),
                              min_size=1, max_size=4), min_size=1, max_size=5),
       split=st.integers(0, 20))
def test_add_sequences_writes_what_add_sequence_writes(tmp_path_factory, docs, split):
    """Many sequences (and document starts) in one call give the same files."""
    tmp = tmp_path_factory.mktemp("bulk")
    idx.write(tmp / "one", docs, np.uint16)
    seqs = [s for d in docs for s in d]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    with idx.IndexedDatasetWriter(tmp / "bulk", np.uint16) as w:
        cut = min(split, len(seqs))                   # two calls, cut anywhere
        for lo, hi in ((0, cut), (cut, len(seqs))):
            part = seqs[lo:hi]
            if part:
                w.add_sequences(np.array([t for s in part for t in s], dtype=np.int64),
                                [len(s) for s in part],
                                new_documents=[k - lo for k in starts if lo <= k < hi])
    for suffix in (".bin", ".idx"):
        assert (tmp / f"bulk{suffix}").read_bytes() == (tmp / f"one{suffix}").read_bytes()


def test_add_sequences_rejects_sizes_that_do_not_add_up(tmp_path):
    w = idx.IndexedDatasetWriter(tmp_path / "d", np.uint16)
    with pytest.raises(idx.IndexedDatasetError, match="add up"):
        w.add_sequences(np.arange(5), [2, 2])
    with pytest.raises(idx.IndexedDatasetError, match="positive"):
        w.add_sequences(np.arange(2), [2, 0])
    with pytest.raises(idx.IndexedDatasetError, match="out of range"):
        w.add_sequences(np.array([70000, 1]), [2])
    w.abort()
    assert not list(tmp_path.iterdir())
