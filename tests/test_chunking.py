"""Greedy packing: hypothesis properties, minimality against a brute force, knowlm mode."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from knowlm_nb import chunking, files, tiny

BOS, EOS = 1, 2


class FakeTokenizer:
    bos_token_id, eos_token_id = BOS, EOS


def doc_sentences(lengths):
    """Sentences of distinct ids (>= 10) so their order is checkable."""
    out, nxt = [], 10
    for n in lengths:
        out.append(list(range(nxt, nxt + n)))
        nxt += n
    return out


def min_samples_brute_force(lengths, capacity):
    """Fewest order-preserving samples: cuts at sentence ends, or anywhere inside a
    sentence longer than ``capacity``; dynamic programming over token offsets."""
    total = sum(lengths)
    allowed = {0, total}
    pos = 0
    for n in lengths:
        if n > capacity:
            allowed.update(range(pos, pos + n))
        pos += n
        allowed.add(pos)
    allowed = sorted(allowed)
    best = {0: 0}
    for p in allowed[1:]:
        cands = [best[q] + 1 for q in best if 0 < p - q <= capacity]
        best[p] = min(cands) if cands else 10**9
    return best[total]


documents = st.lists(st.integers(min_value=1, max_value=40), min_size=0, max_size=25)


@settings(max_examples=300, deadline=None)
@given(lengths=documents, max_len=st.integers(min_value=3, max_value=48))
def test_greedy_properties(lengths, max_len):
    sentences = doc_sentences(lengths)
    chunker = chunking.Chunker(FakeTokenizer(), max_len)
    samples, stats = chunker.pack(sentences)
    # 1. every sample fits
    assert all(len(s) <= max_len for s in samples)
    if not lengths:
        assert samples == []
        return
    # 2. specials removed, the samples concatenate to exactly the sentences
    assert all(s[0] == BOS for s in samples) and samples[-1][-1] == EOS
    content = [t for s in samples for t in s[1:].tolist()]
    assert content[-1] == EOS and EOS not in content[:-1]
    assert content[:-1] == [t for s in sentences for t in s]
    assert stats.duplicated_tokens == 0 and stats.tokens == sum(len(s) for s in samples)
    # 3. a cut falls inside a sentence only when that sentence alone is too long
    capacity = max_len - 1
    starts, pos = {}, 0
    for n in lengths:
        starts[pos] = n
        pos += n
    starts[pos] = 1                                # the closing </s>
    cut, inside_ok = 0, set()
    pos = 0
    for n in lengths:
        if n > capacity:
            inside_ok.update(range(pos + 1, pos + n))
        pos += n
    for s in samples[:-1]:
        cut += len(s) - 1
        assert cut in starts or cut in inside_ok, f"cut at {cut} splits a short sentence"
    # 4. minimal count (EOS packed as a final one-token item)
    assert len(samples) == min_samples_brute_force(lengths + [1], capacity)


@settings(max_examples=100, deadline=None)
@given(lengths=documents, max_len=st.integers(min_value=3, max_value=48),
       min_len=st.integers(min_value=0, max_value=48))
def test_min_len_drop_is_explicit_and_counted(lengths, max_len, min_len):
    min_len = min(min_len, max_len)
    chunker = chunking.Chunker(FakeTokenizer(), max_len, min_len=min_len)
    samples, stats = chunker.pack(doc_sentences(lengths))
    everything, _ = chunking.Chunker(FakeTokenizer(), max_len).pack(doc_sentences(lengths))
    assert all(len(s) >= min_len for s in samples)
    assert stats.samples + stats.dropped_samples == len(everything)
    assert stats.tokens + stats.dropped_tokens == sum(len(s) for s in everything)


def test_greedy_cuts_worked_example():
    # capacity 10: [4, 5] fit together, 3 opens a new sample, 25 fills it up and
    # continues in full pieces, 2 joins the last piece
    assert chunking.greedy_cuts([4, 5, 3, 25, 2], 10) == [9, 19, 29, 39]


def test_knowlm_spans_reproduce_the_original_overlap():
    # the example in KnowLM's preprocess.py docstring
    lengths = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200]
    spans = chunking.knowlm_spans(lengths, 1024)
    assert spans[:3] == [(0, 4), (3, 5), (5, 6)]   # sample 2 re-uses sentence 3
    assert sum(b - a for a, b in spans) > len(lengths)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=25),
       max_len=st.integers(min_value=3, max_value=48))
def test_knowlm_mode_covers_everything_but_duplicates(lengths, max_len):
    sentences = doc_sentences(lengths)
    samples, stats = chunking.Chunker(FakeTokenizer(), max_len, mode="knowlm").pack(sentences)
    assert all(len(s) <= max_len for s in samples)
    flat = [t for s in sentences for t in s]
    seen = {t for s in samples for t in s.tolist()}
    assert set(flat) <= seen                       # nothing lost ...
    total = len(flat) + 2                          # ... BOS and EOS once each
    assert stats.duplicated_tokens == sum(len(s) for s in samples) - total


def test_knowlm_mode_duplicates_on_a_simple_document():
    # units <s>+4, 4, 4+</s>: the second sample reaches back over the middle sentence
    samples, stats = chunking.Chunker(FakeTokenizer(), 10, mode="knowlm").pack(
        doc_sentences([4, 4, 4]))
    assert [len(s) for s in samples] == [9, 9] and stats.duplicated_tokens == 4
    greedy, gstats = chunking.Chunker(FakeTokenizer(), 10).pack(doc_sentences([4, 4, 4]))
    assert [len(s) for s in greedy] == [9, 6] and gstats.duplicated_tokens == 0


@pytest.mark.parametrize("max_len", [0, 1, 2, -5, 2.5, "256", True])
def test_max_len_too_small_or_wrong_type(max_len):
    with pytest.raises(chunking.ChunkError, match="max_len"):
        chunking.Chunker(FakeTokenizer(), max_len)


def test_bad_mode_and_min_len():
    with pytest.raises(chunking.ChunkError, match="mode"):
        chunking.Chunker(FakeTokenizer(), 16, mode="overlap")
    with pytest.raises(chunking.ChunkError, match="min_len"):
        chunking.Chunker(FakeTokenizer(), 16, min_len=17)


def test_pieces_cut_long_strings_at_spaces_and_lose_nothing():
    text = ("word " * 3000) + "x" * 9000
    pieces = chunking.pieces(text, 4096)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 4096
    assert pieces[0].endswith("word") or pieces[0].endswith(" ")


# ------------------------------------- tokenize once: a real tokenizer, real text

@pytest.fixture(scope="module")
def tokenizers_two_ways(tmp_path_factory):
    """The same byte-level BPE twice: as trained (sentence ends found from byte
    lengths) and with a normalizer that changes nothing here (found from offsets)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    sample = files.find_files("data_samples/corpus/*.jsonl")
    tok = tiny.train_tokenizer(tiny.iter_texts(sample), vocab_size=600)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([])
    other = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    return tiny.train_tokenizer(tiny.iter_texts(sample), vocab_size=600), other


sentence_text = st.text(alphabet="ab cd,.!?\n中文。，！“”é😀\t", max_size=60)


def check_packing(tok, sentences: list[str], max_len: int):
    """The chunker's promises on one document, for tokenizer ``tok``: samples of at
    most ``max_len`` tokens, ``<s>`` first, ``</s>`` last, their content exactly the
    document's own tokenization, cut only at sentence ends (or inside a sentence
    that alone is longer than a sample). Returns ``(unit lengths, samples)``."""
    chunker = chunking.Chunker(tok, max_len)
    text = "".join(sentences)
    (samples,) = chunker.chunk([sentences])
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert all(len(s) <= max_len for s in samples)
    assert chunker.work["calls"] == (1 if text else 0)
    content = [t for s in samples for t in s[1:].tolist()]
    if not ids:
        assert samples == []
        return None
    assert all(s[0] == BOS for s in samples) and content[-1] == EOS
    assert content[:-1] == ids                       # the document's own tokens, once
    ((_, lengths),) = chunking.Chunker(tok, max_len).tokenize([sentences])
    ends, pos, inside_ok = {0}, 0, set()
    for n in lengths:
        if n > max_len - 1:
            inside_ok.update(range(pos + 1, pos + n))
        pos += n
        ends.add(pos)
    cut = 0
    for s in samples[:-1]:
        cut += len(s) - 1
        assert cut in ends or cut in inside_ok
    return lengths, [s.tolist() for s in samples]


@settings(max_examples=150, deadline=None)
@given(sentences=st.lists(sentence_text, max_size=12),
       max_len=st.integers(min_value=3, max_value=40))
def test_samples_concatenate_to_the_documents_whole_tokenization(tokenizers_two_ways, sentences,
                                                                 max_len):
    found = [check_packing(tok, sentences, max_len) for tok in tokenizers_two_ways]
    assert found[0] == found[1]          # byte lengths and offsets find the same ends


@pytest.fixture(scope="module")
def llama_like_tokenizer():
    """A tokenizer built the way LLaMA's (KnowLM's) is converted to ``tokenizer.json``:
    a SentencePiece-style BPE with ``▁`` for spaces (normalizer: prepend ``▁``,
    replace spaces) and byte fallback (``<0xE9>``) for characters not in the
    vocabulary. Not byte-level: the chunker maps sentence ends with offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = tiny.iter_texts(files.find_files("data_samples/corpus/*.jsonl"))
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # trained on words, as SentencePiece is: a piece may start with ▁, never hold one inside
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=300))
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = None                      # encoding: the normalizer does it all
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    vocab = spec["model"]["vocab"]
    for b in range(256):                              # the byte-fallback pieces
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@settings(max_examples=150, deadline=None)
@given(sentences=st.lists(sentence_text, max_size=12),
       max_len=st.integers(min_value=3, max_value=40))
def test_llama_like_tokenizer_packs_its_own_tokenization(llama_like_tokenizer, sentences,
                                                         max_len):
    check_packing(llama_like_tokenizer, sentences, max_len)


def test_llama_like_sentence_ends_include_byte_fallback_pieces(llama_like_tokenizer):
    tok = llama_like_tokenizer
    sentences = ["今天下雨。", "明天晴😀！", " Hello world.", " He left."]
    chunker = chunking.Chunker(tok, 64)
    ((ids, lengths),) = chunker.tokenize([sentences])
    assert chunker._backend is not None and chunker._byte_len is None     # offsets, not bytes
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    assert any(p.startswith("<0x") for p in pieces)           # byte fallback was used
    pos, decoded = 0, []
    for n in lengths:
        decoded.append(tok.decode(ids[pos:pos + n].tolist()))
        pos += n
    # every sentence comes back whole (the decoder strips one leading space per call)
    assert [d.strip() for d in decoded] == [s.strip() for s in sentences]


def test_sentence_ends_map_to_token_boundaries(tokenizers_two_ways):
    tok = tokenizers_two_ways[0]
    sentences = ["今天下雨。", "明天晴！", " Hello world.", " He left."]
    ((ids, lengths),) = chunking.Chunker(tok, 64).tokenize([sentences])
    decoded = []
    pos = 0
    for n in lengths:
        decoded.append(tok.decode(ids[pos:pos + n].tolist()))
        pos += n
    assert decoded == sentences


def test_tokenizer_files_reads_what_the_chunker_needs(tmp_path, tokenizers_two_ways):
    tok = tokenizers_two_ways[0]
    tok.save_pretrained(tmp_path / "tok")
    light = chunking.TokenizerFiles(tmp_path / "tok")
    assert (light.bos_token_id, light.eos_token_id, len(light)) == (
        tok.bos_token_id, tok.eos_token_id, len(tok))
    with pytest.raises(chunking.ChunkError, match="tokenizer.json"):
        chunking.TokenizerFiles(tmp_path)


def test_a_byte_table_that_does_not_add_up_falls_back_to_offsets(tokenizers_two_ways):
    """If the tokens' byte lengths do not add up to the text (not a plain byte-level
    BPE after all), the chunker maps sentence ends with the tokenizer's offsets."""
    tok = tokenizers_two_ways[0]
    docs = [["今天下雨。", "明天晴！", " Hello world."], [" He left.", " é😀 ok."]]
    good = chunking.Chunker(tok, 16)
    expect = good.tokenize(docs)
    assert good._byte_len is not None                       # the fast path was taken
    bad = chunking.Chunker(tok, 16)
    bad._backend, byte_len = chunking._raw_backend(tok)
    bad._byte_len = byte_len + 1                            # every token one byte too long
    got = bad.tokenize(docs)
    assert bad._byte_len is None                            # it noticed, and used offsets
    assert [(i.tolist(), n) for i, n in got] == [(i.tolist(), n) for i, n in expect]


def test_one_tokenizer_thread_sets_and_restores_the_variable(monkeypatch):
    import os
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with chunking.one_tokenizer_thread():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with pytest.raises(RuntimeError):
        with chunking.one_tokenizer_thread():
            raise RuntimeError("boom")
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    with chunking.one_tokenizer_thread(active=False):
        assert "TOKENIZERS_PARALLELISM" not in os.environ
