"""Corpus prep: sentence splitters, cleaning, dedup, bad input, prepare end to end, mixing."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from knowlm_nb import ROOT, chunking, corpus, files, indexed_dataset, tiny
from conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer like notebook 00's (trained in a second)."""
    sample = files.find_files("data_samples/corpus/*.jsonl")
    tok = tiny.train_tokenizer(tiny.iter_texts(sample), vocab_size=600)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save_pretrained(out)
    return out


def run(inputs, tokenizer_dir, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("max_len", 64)
    kw.setdefault("num_proc", 1)
    return corpus.prepare(inputs, tokenizer_dir, out_prefix=out, **kw)


# ------------------------------------------------------------ sentence splitting

ZH_CASES = [
    ("今天下雨。明天晴！后天呢？", ["今天下雨。", "明天晴！", "后天呢？"]),
    ("他说：“你好！”然后走了。", ["他说：“你好！”", "然后走了。"]),
    ("（见图1。）下一句；再下一句", ["（见图1。）", "下一句；", "再下一句"]),
    ("等一下……好吧。", ["等一下……", "好吧。"]),
    ("价格是3.5元。第二行\n第三行", ["价格是3.5元。", "第二行\n", "第三行"]),
    ("《红楼梦》很长。", ["《红楼梦》很长。"]),
    ("", []),
]

EN_CASES = [
    ("Dr. Smith arrived at 5 p.m. today. He left early.",
     ["Dr. Smith arrived at 5 p.m. today.", " He left early."]),
    ("The value is 3.14 exactly. Next one.", ["The value is 3.14 exactly.", " Next one."]),
    ("J. R. R. Tolkien wrote it. It sold well.", ["J. R. R. Tolkien wrote it.", " It sold well."]),
    ("It works in the U.S. and elsewhere. Really?! Yes.",
     ["It works in the U.S. and elsewhere.", " Really?!", " Yes."]),
    ("Line one without stop\nLine two.", ["Line one without stop\n", "Line two."]),
    ("no punctuation at all", ["no punctuation at all"]),
    ("Washington D.C. is big. See e.g. the list. Version v1.0 shipped.",
     ["Washington D.C. is big.", " See e.g. the list.", " Version v1.0 shipped."]),
    ('He said "Stop." Then he left. Visit https://example.com/a.html today. Thanks!',
     ['He said "Stop."', " Then he left.", " Visit https://example.com/a.html today.",
      " Thanks!"]),
    ("First line.\n\nSecond para. Two sentences.",
     ["First line.\n\n", "Second para.", " Two sentences."]),
]

CODE_SAMPLE = '''import os


def f(x):
    """Doc. With a stop."""
    return x + 1

@decorator
def g():
    pass
class C:
    y = 2
'''


CODE_CASES = [
    ("function a() {\n  return 1;\n}\nfunction b() {}\n",
     ["function a() {\n  return 1;\n}\n", "function b() {}\n"]),
    ("def f():\n    x = 1\n\n    return x\n", ["def f():\n    x = 1\n\n", "    return x\n"]),
    ("x = 1  # no newline at the end", ["x = 1  # no newline at the end"]),
    ("#include <stdio.h>\nint main(void) {\n\treturn 0;\n}", ["#include <stdio.h>\nint main(void) {\n\treturn 0;\n}"]),
]


@pytest.mark.parametrize("text,expected", CODE_CASES)
def test_split_code_table(text, expected):
    assert corpus.split_code(text) == expected


@pytest.mark.parametrize("text,expected", ZH_CASES)
def test_split_zh(text, expected):
    assert corpus.split_zh(text) == expected


@pytest.mark.parametrize("text,expected", EN_CASES)
def test_split_en(text, expected):
    got = corpus.split_en(text)
    assert got == expected and "".join(got) == text


def test_split_code_between_lines_at_blank_lines_and_top_level_blocks():
    blocks = corpus.split_code(CODE_SAMPLE)
    assert "".join(blocks) == CODE_SAMPLE
    assert blocks == ["import os\n\n\n",
                      'def f(x):\n    """Doc. With a stop."""\n    return x + 1\n\n',
                      "@decorator\ndef g():\n    pass\n",
                      "class C:\n    y = 2\n"]
    assert all(b.endswith("\n") for b in blocks)          # never inside a line


@pytest.mark.parametrize("path", sorted((ROOT / "data_samples" / "corpus").glob("*.jsonl")),
                         ids=lambda p: p.name)
def test_splitters_lose_nothing_on_the_sample_corpus(path):
    for _, rec in list(files.iter_jsonl(path))[:30]:
        text = corpus.normalize(rec["text"], rec["lang"])
        parts = corpus.split_sentences(text, rec["lang"])
        assert "".join(parts) == text and all(parts)


def test_one_megabyte_line_without_punctuation_costs_linear_work(tokenizer_dir):
    # work counted, not seconds (the wall-clock ratio is in `python -m knowlm_nb.bench chunking`)
    chunker = chunking.Chunker(chunking.TokenizerFiles(tokenizer_dir), 256)

    def work(n):
        chunker.work.clear()
        (samples,) = chunker.chunk([corpus.split_sentences("abcdefghij" * (n // 10), "en")])
        return dict(chunker.work), samples

    small, _ = work(250_000)
    big, samples = work(1_000_000)
    assert all(len(s) <= 256 for s in samples) and len(samples) > 100
    assert small["calls"] == big["calls"] == 1                 # one tokenizer call per batch
    assert big["chars"] == 4 * small["chars"]
    # in pieces of bounded size, so the tokenizer's cost per piece is bounded: linear in all
    assert big["longest"] <= chunking.PIECE_CHARS and small["longest"] <= chunking.PIECE_CHARS
    assert 3.9 < big["strings"] / small["strings"] < 4.1
    assert 3.9 < big["tokens"] / small["tokens"] < 4.1
    zh = "中" * 300_000
    assert "".join(corpus.split_sentences(zh, "zh")) == zh


def test_sentencex_and_line_breaks_lose_nothing_on_hostile_english():
    text = "Go on. " * 50_000 + "no stop\n" * 1000 + "x" * 100_000
    parts = corpus.split_en(text)
    assert "".join(parts) == text and len(parts) == 51_001


# ------------------------------------------------------------- cleaning, dedup

def test_normalize_strips_controls_keeps_code_indentation():
    assert corpus.normalize("a\x00b\u200b\r\nc\x07\td", "en") == "ab\nc d"
    code = "def f():\n\tif x:\r\n\t\treturn 1\x0c\n"
    assert corpus.normalize(code, "code") == "def f():\n\tif x:\n\t\treturn 1"
    assert corpus.normalize("e\u0301", "en") == "\u00e9"                     # NFC


@pytest.mark.parametrize("text,lang,reason", [
    ("short", "en", "too_short"),
    ("$$$ ### %%% &&& *** ((( ))) !!! @@@ 12345 67890", "en", "low_text_ratio"),
    ("same line here\n" * 10, "en", "repetitive"),
    ("A perfectly normal sentence about rivers and mountains.", "en", None),
])
def test_quality_filters(text, lang, reason):
    assert corpus.quality_reason(text, lang) == reason


def test_deduper_exact_and_near():
    d = corpus.Deduper()
    base = " ".join(f"word{i}" for i in range(300))
    near = base.replace("word150", "changed")
    other = " ".join(f"token{i}" for i in range(300))
    assert d.check(corpus.exact_key(base), corpus.minhash_values(base)) is None
    assert d.check(corpus.exact_key(base + "  "), corpus.minhash_values(base)) == "exact_duplicate"
    assert d.check(corpus.exact_key(near), corpus.minhash_values(near)) == "near_duplicate"
    assert d.check(corpus.exact_key(other), corpus.minhash_values(other)) is None


# -------------------------------------------------------------- prepare

def test_prepare_end_to_end(tiny_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out" / "ds"
    stats = run([tiny_corpus], tokenizer_dir, out, max_len=64, min_len=4, weights="natural")
    ds = indexed_dataset.IndexedDataset(out)
    assert len(ds) == stats["samples"] > 0 and ds.num_tokens == stats["tokens"]
    assert int(ds.sizes.max()) <= 64 and int(ds.sizes.min()) >= 4
    assert ds.dtype == np.uint16
    saved = json.loads((tmp_path / "out" / "ds.stats.json").read_text())
    assert saved["samples"] == stats["samples"]
    assert set(saved["sources"]) == {"code", "en_a", "en_b", "zh_a", "zh_b"}
    for row in saved["sources"].values():
        assert row["in"] == row["out"] + sum(row["dropped"].values())
    # natural weights: every packed sample exactly once
    assert stats["samples"] == stats["chunking"]["samples"]
    assert stats["tokens"] == stats["chunking"]["tokens"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx",
                                                                    "ds.stats.json"]


def test_prepare_outputs_are_readable_by_group_and_others(tiny_corpus, tokenizer_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run([tiny_corpus], tokenizer_dir, tmp_path / "out" / "d")
    finally:
        os.umask(old)
    for suffix in (".bin", ".idx", ".stats.json"):
        mode = (tmp_path / "out" / f"d{suffix}").stat().st_mode & 0o777
        assert mode == 0o644, f"d{suffix} has mode {oct(mode)}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.bin", "d.idx",
                                                                    "d.stats.json"]


def test_prepare_tokens_are_the_documents_own_tokenization(tiny_corpus, tokenizer_dir, tmp_path):
    # natural weights, no min_len: the dataset holds every document's own tokenization once,
    # plus <s> per sample and </s> per document (the blend shuffles samples, so count tokens)
    from tokenizers import Tokenizer

    stats = run([tiny_corpus], tokenizer_dir, tmp_path / "d", weights="natural", dedup=False)
    ds = indexed_dataset.IndexedDataset(tmp_path / "d")
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True        # a literal "</s>" in a document is text
    texts = [d.text for d, _ in corpus.cleaned_sentences([tiny_corpus], dedup=False)]
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    want = np.bincount(np.concatenate(ids), minlength=len(tok.get_vocab()))
    want[1] += len(ds)
    want[2] += len(texts)
    got = np.bincount(np.asarray(ds.tokens, dtype=np.int64), minlength=len(want))
    assert np.array_equal(got, want)
    ch = stats["chunking"]
    assert ch["content_tokens"] == sum(map(len, ids)) and ch["duplicated_tokens"] == 0
    assert ch["long_documents"] == sum(len(i) + 2 > 64 for i in ids)
    assert ch["mean_fill_long"] > ch["mean_fill_short"]


def test_prepare_parallel_equals_serial(tiny_corpus, tokenizer_dir, tmp_path):
    a = run([tiny_corpus], tokenizer_dir, tmp_path / "a", num_proc=1)
    b = run([tiny_corpus], tokenizer_dir, tmp_path / "b", num_proc=2)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert a["chunking"] == b["chunking"]


def test_prepare_output_reads_in_megatron(tiny_corpus, tokenizer_dir, tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    run([tiny_corpus], tokenizer_dir, tmp_path / "d")
    ours, theirs = indexed_dataset.IndexedDataset(tmp_path / "d"), MegatronIndexed(str(tmp_path / "d"))
    assert len(ours) == len(theirs)
    for i in range(0, len(ours), 7):
        assert ours[i].tolist() == theirs[i].tolist()


def test_knowlm_weights_are_realized_within_one_percent(tiny_corpus, tokenizer_dir, tmp_path):
    stats = run([tiny_corpus], tokenizer_dir, tmp_path / "d")
    blend = stats["blend"]
    total = sum(corpus.KNOWLM_WEIGHTS.values())
    for lang, w in corpus.KNOWLM_WEIGHTS.items():
        assert abs(blend["realized"][lang] - w / total) < 0.01


def test_blend_index_every_prefix_is_mixed_and_deterministic():
    counts = {"zh": 50, "en": 400, "code": 7}
    w = {"zh": 5.5, "en": 1.5, "code": 0.9}
    di, si, names = corpus.blend_index(counts, w, 2000, seed=3)
    di2, si2, _ = corpus.blend_index(counts, w, 2000, seed=3)
    assert np.array_equal(di, di2) and np.array_equal(si, si2)
    target = np.array([w[n] for n in names]) / sum(w.values())
    for prefix in (100, 500, 2000):
        share = np.bincount(di[:prefix], minlength=len(names)) / prefix
        assert np.all(np.abs(share - target) < 0.01)
    for d, n in enumerate(names):        # repeats only after a source is used up
        drawn = si[di == d]
        assert drawn.max() < counts[n]
        assert len(set(drawn[:counts[n]].tolist())) == min(counts[n], len(drawn))


def test_weights_errors(tiny_corpus, tokenizer_dir, tmp_path):
    with pytest.raises(corpus.CorpusError, match="no weight for language"):
        run([tiny_corpus], tokenizer_dir, tmp_path / "d", weights={"zh": 1.0})
    with pytest.raises(corpus.CorpusError, match="non-negative"):
        run([tiny_corpus], tokenizer_dir, tmp_path / "d", weights={"zh": -1})


# ------------------------------------------------------------------ bad input

GOOD = {"text": "The river flows to the sea. It is long and wide.", "lang": "en"}


def write_bad_corpus(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(GOOD).encode(),
             b'{"text": "unterminated',
             b'\xff\xfe not utf-8',
             json.dumps({"lang": "en"}).encode(),
             json.dumps({"text": 42}).encode(),
             b"",
             json.dumps({**GOOD, "text": "Another river, another sea. It is short."}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_lines_are_skipped_counted_and_located(tmp_path, tokenizer_dir):
    path = write_bad_corpus(tmp_path)
    stats = run([str(path)], tokenizer_dir, tmp_path / "d", weights="natural")
    assert stats["unreadable"] == {"malformed_json": 1, "invalid_utf8": 1, "missing_text": 1,
                                   "text_not_string": 1}
    where = {e["where"]: e["reason"] for e in stats["unreadable_lines"]}
    assert where == {f"{path}:2": "malformed_json", f"{path}:3": "invalid_utf8",
                     f"{path}:4": "missing_text", f"{path}:5": "text_not_string"}
    assert stats["sources"]["bad"]["in"] == 6 and stats["sources"]["bad"]["out"] == 2


def test_strict_fails_on_the_first_bad_line(tmp_path, tokenizer_dir):
    path = write_bad_corpus(tmp_path)
    with pytest.raises(corpus.CorpusError, match=rf"{path.name}:2: malformed json"):
        run([str(path)], tokenizer_dir, tmp_path / "d", strict=True)
    assert not list(tmp_path.glob("d.*")) and not list(tmp_path.glob(".d.*"))


def test_empty_corpus_is_a_clear_error(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(corpus.CorpusError, match="empty corpus"):
        run([str(tmp_path / "empty.jsonl")], tokenizer_dir, tmp_path / "d")
    write_jsonl(tmp_path / "short.jsonl", [{"text": "hi", "lang": "en"}])
    with pytest.raises(corpus.CorpusError, match="empty corpus.*too_short: 1"):
        run([str(tmp_path / "short.jsonl")], tokenizer_dir, tmp_path / "d")
    with pytest.raises(corpus.CorpusError, match="no files match"):
        run([str(tmp_path / "nothing*.jsonl")], tokenizer_dir, tmp_path / "d")
    assert not list(tmp_path.glob("d.*")) and not list(tmp_path.glob(".d.*"))


@pytest.mark.parametrize("max_len", [0, 2])
def test_max_len_too_small_is_an_error(tiny_corpus, tokenizer_dir, tmp_path, max_len):
    with pytest.raises(chunking.ChunkError, match="BOS \\+ EOS"):
        run([tiny_corpus], tokenizer_dir, tmp_path / "d", max_len=max_len)


def test_missing_tokenizer_is_an_error(tiny_corpus, tmp_path):
    with pytest.raises(corpus.CorpusError, match="tokenizer"):
        run([tiny_corpus], tmp_path / "no-tokenizer", tmp_path / "d")


def test_plain_text_and_duplicates(tmp_path, tokenizer_dir):
    text = " ".join(f"Day {i} of the diary: the weather was mild and it rained {i % 7} times."
                    for i in range(40))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text(text, encoding="utf-8")
    (tmp_path / "c.txt").write_text(text.replace("Day 20 ", "Night 20 "), encoding="utf-8")
    stats = run([str(tmp_path / "*.txt")], tokenizer_dir, tmp_path / "d", weights="natural")
    assert stats["sources"]["a"]["out"] == 1
    assert stats["sources"]["b"]["dropped"] == {"exact_duplicate": 1}
    assert stats["sources"]["c"]["dropped"] == {"near_duplicate": 1}


def test_special_token_text_is_not_a_special_token(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "s.jsonl", [{"text": "Text that mentions </s> and <s> literally.",
                                        "lang": "en"}])
    run([str(tmp_path / "s.jsonl")], tokenizer_dir, tmp_path / "d", weights="natural")
    (ids,) = [s.tolist() for s in indexed_dataset.IndexedDataset(tmp_path / "d").document(0)]
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]


def test_cli(tiny_corpus, tokenizer_dir, tmp_path, capsys):
    rc = corpus.main(["prepare", "--input", tiny_corpus, "--tokenizer", str(tokenizer_dir),
                      "--max-len", "64", "--out", str(tmp_path / "d"), "--quiet",
                      "--weights", "zh=1,en=1,code=1"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["samples"] > 0
    rc = corpus.main(["prepare", "--input", tiny_corpus, "--tokenizer", str(tokenizer_dir),
                      "--max-len", "2", "--out", str(tmp_path / "e"), "--quiet"])
    assert rc == 2 and "max_len" in capsys.readouterr().err


# ------------------------------------------- reading in batches, the fast paths

def test_raw_batches_keep_file_line_numbers_across_batches_and_files(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b'{"text": "x"}\n\n{"text": "y"}\n{"text": "z"}\n')
    b = tmp_path / "b.txt"
    b.write_text("a plain-text document")
    c = tmp_path / "c.jsonl"
    c.write_bytes(b'{"text": "w"}')                        # no final line break
    expect = [(f"{a}:1", b'{"text": "x"}\n'), (f"{a}:2", b"\n"), (f"{a}:3", b'{"text": "y"}\n'),
              (f"{a}:4", b'{"text": "z"}\n'), (str(b), b"a plain-text document"),
              (f"{c}:1", b'{"text": "w"}')]
    for size in (1, 2, 3, 4, 100):
        batches = list(corpus.raw_batches([a, b, c], size))
        got = [(where, raw) for batch in batches for where, _, _, raw in corpus.records(batch)]
        assert got == expect
        per_batch = [sum(len(run[4]) for run in batch) for batch in batches]
        assert all(n == size for n in per_batch[:-1]) and 0 < per_batch[-1] <= size
    assert [r[0] for r in corpus.raw_records([a, b, c])] == [w for w, _ in expect]


@pytest.mark.parametrize("num_proc,batch_docs", [(2, 1), (2, 3), (3, 2)])
def test_prepare_in_many_small_batches_equals_serial(tiny_corpus, tokenizer_dir, tmp_path,
                                                     num_proc, batch_docs):
    """Many batches, so that worker results and the main process's own batches
    interleave (the in-flight window fills): the output is still in reading order."""
    a = run([tiny_corpus], tokenizer_dir, tmp_path / "a", num_proc=1, dedup=True)
    b = run([tiny_corpus], tokenizer_dir, tmp_path / "b", num_proc=num_proc, dedup=True,
            batch_docs=batch_docs)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert (a["chunking"], a["sources"], a["groups"]) == (b["chunking"], b["sources"], b["groups"])


def _normalize_reference(text: str, lang: str) -> str:
    """What normalize did before its fast paths (every step, always)."""
    import re
    import unicodedata
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if lang == "code":
        return corpus._CONTROL.sub("", text).strip("\n")
    text = corpus._CONTROL.sub("", text).replace("\t", " ")
    text = re.sub(r"[ \u3000]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="ab .\n\r\t \u3000\x00\x07\x85\u200b\ufeffe\u0301\u00e9中", max_size=40),
       lang=st.sampled_from(["en", "zh", "code"]))
def test_normalize_fast_paths_change_nothing(text, lang):
    assert corpus.normalize(text, lang) == _normalize_reference(text, lang)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab1 .,\n\t\x0b\x1c中é😀$", max_size=40))
def test_letter_count_ascii_path_equals_the_table(text):
    expect = (sum(not ch.isspace() for ch in text), sum(ch.isalpha() for ch in text))
    assert corpus._count_visible_and_letters(text) == expect


def test_blend_written_in_small_chunks_is_the_same(tiny_corpus, tokenizer_dir, tmp_path,
                                                    monkeypatch):
    """The blend gathers a bounded number of tokens at a time; the chunk size changes nothing."""
    import functools
    whole = run([tiny_corpus], tokenizer_dir, tmp_path / "a", num_samples=500)
    monkeypatch.setattr(corpus, "_write_blend",
                        functools.partial(corpus._write_blend, chunk_tokens=37))
    small = run([tiny_corpus], tokenizer_dir, tmp_path / "b", num_samples=500)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert whole["blend"] == small["blend"] and whole["blend"]["num_samples"] == 500
