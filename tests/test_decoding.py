"""Shared decoding: batched generation, the copy-constrained NER grammar, token bytes, copy errors."""
import pytest
import torch

from knowlm_nb import decoding, tiny


@pytest.fixture(scope="module")
def tok_and_model(tmp_path_factory):
    zoo = tiny.build_zoo(tmp_path_factory.mktemp("zoo"), verbose=False, hidden_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=4, intermediate_size=128)
    return zoo.load()


def test_generate_batched_left_padding_matches_one_by_one(tok_and_model):
    tok, model = tok_and_model
    prompts = ["Hello there", "A much longer prompt than the first one, with more words"]
    side = tok.padding_side
    batched = decoding.generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    single = [decoding.generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == side  # restored
    with pytest.raises(decoding.DecodingError, match="max_new_tokens"):
        decoding.generate(model, tok, prompts, max_new_tokens=0)



def test_ner_grammar_takes_labels_and_copied_spans_only():
    g = decoding.NerGrammar("Marta Velling joined Harrowgate Institute (HI) in 2019.",
                             ["person", "organization", "time"], "NONE")
    cases = {  # answer -> (still inside the grammar, a complete answer)
        "(person, Marta Velling)": (True, True),
        "(person, Marta Velling), (time, 2019)": (True, True),
        "(person, Marta Vellin": (True, False),
        "(person, Marta Velling),": (True, False),
        "NONE": (True, True), "NO": (True, False),
        "(organization, HI)": (True, True),
        "(person, Marta Velling), (person, Marta Velling)": (False, False),  # a pair twice
        "(persn, ": (False, False),  # not a label
        "(time, 2020)": (False, False),  # not in the text
        "(organization, (HI": (False, False), "(person, )": (False, False),
        "(person, Marta Velling) x": (False, False),
    }
    for answer, (inside, complete) in cases.items():
        state = g.feed(g.START, answer.encode())
        assert (state is not None, state is not None and g.complete(state)) == (inside, complete), answer
    zh = decoding.NerGrammar("2019年1月，武装分子袭击了涛雅港附近", ["人物", "地点", "时间"], "无")
    assert zh.complete(zh.feed(zh.START, "(时间, 2019年1月), (地点, 涛雅港)".encode()))
    assert zh.feed(zh.START, "(地点, 涛雅港口)".encode()) is None
    # a broken character: the first two bytes of 港 are in the text, 港's start + 口's end is not
    assert zh.feed(zh.START, "(地点, 涛雅".encode() + "港".encode()[:2]) is not None
    assert zh.feed(zh.START, "(地点, 涛雅".encode() + "港".encode()[:2] + "口".encode()[2:]) is None
    assert zh.feed(zh.START, "(地点, ".encode() + "涛".encode()[1:]) is None  # nor start inside one
    # a span does not cut a word: it starts and ends where a word does (or on a
    # CJK character, which has no word breaks)
    en = "Nadia Sorel-Hahn played with the Ellesmere Philharmonic in 2021."
    ww = decoding.NerGrammar(en, ["person", "organization", "time"], "NONE")
    for answer, whole in [("(organization, Ellesmere Philharmonic)", True),
                          ("(person, Hahn)", True), ("(time, 2021)", True),
                          ("(organization, Ellesmere Philhar)", False), ("(person, adia Sorel)", False),
                          ("(time, 202)", False)]:
        assert (ww.feed(ww.START, answer.encode()) is not None) == whole, answer
        assert answer[answer.index(", ") + 2:-1] in en  # each is in the text: only the cut is refused
    assert ww.feed(ww.START, b"(organization, Ellesmere Philhar") is not None  # on its way to a whole word
    assert ww.feed(ww.START, b"(person, adia") is None
    mixed = decoding.NerGrammar("银燕X73于2023年发布。", ["产品", "时间"], "无")
    for answer, ok in [("(产品, 银燕X73)", True), ("(产品, 燕X73)", True), ("(时间, 2023)", True),
                       ("(时间, 2023年)", True), ("(产品, 银燕X7)", False), ("(时间, 023年)", False)]:
        assert (mixed.feed(mixed.START, answer.encode()) is not None) == ok, answer


def test_copy_errors_count_invented_names_and_cut_words():
    examples = [{"input": "Nadia Sorel-Hahn played with the Ellesmere Philharmonic in 2021.", "lang": "en"},
                {"input": "银燕X73于2023年发布。", "lang": "zh"}]
    preds = ["(person, Nadia Sorel-Hahn), (person, Hahn), (organization, Ellesmere Philhar), "
             "(organization, Ellesmere Phil), (person, Nadia Sorel-Hahm), (time, 2021)",
             "(产品, 燕X7), (时间, 2023年), (地点, 北京)"]
    assert decoding.copy_errors(preds, examples) == {"pairs": 9, "not_in_text": 2, "cut_words": 3}
    assert decoding.copy_errors(["NONE", "无"], examples) == {"pairs": 0, "not_in_text": 0, "cut_words": 0}
    with pytest.raises(ValueError):
        decoding.copy_errors(preds[:1], examples)  # one prediction per example


@pytest.mark.parametrize("added", [[], ["远", "航", "智能", "Marta"]])
def test_copy_constraint_allows_exactly_the_tokens_that_stay_in_the_grammar(added):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.SHIPPED_BASE)
    tok.add_tokens(added)  # a vocabulary extension: added tokens stand for their own text
    examples = [{"input": "Marta Velling joined Harrowgate Institute in 2019.", "lang": "en"},
                {"input": "远航科技于2022年3月收购翼展智能。", "lang": "zh"}]
    allowed = decoding.ner_copy_constraint(tok, examples)(0, 0)
    vocab = decoding.vocabulary_bytes(tok)
    assert {vocab[tok.convert_tokens_to_ids(t)] for t in added} == {t.encode() for t in added}
    for row, answer, complete in [(0, "", False), (0, "(per", False), (0, "(person, Mar", False),
                                  (0, "(person, Marta Velling)", True), (0, "NONE", True),
                                  (1, "(组织, 远航", False), (1, "(组织, 远航科技), (时间, 2022年3月)", True)]:
        ids = torch.tensor(tok(answer, add_special_tokens=False)["input_ids"], dtype=torch.long)
        grammar = decoding.NerGrammar.for_example(examples[row])
        state = grammar.feed(grammar.START, answer.encode())
        brute = {i for i, data in vocab.items() if grammar.feed(state, data) is not None}
        got = allowed(row, ids)
        assert set(got) - {tok.eos_token_id} == brute, answer  # the trie walk misses none, adds none
        assert (tok.eos_token_id in got) == complete, answer
    assert tok.convert_tokens_to_ids("Ġthe") not in allowed(0, torch.tensor([], dtype=torch.long))
    # once EOS is out, only EOS (the row is finished)
    assert allowed(0, torch.tensor([tok.eos_token_id])) == [tok.eos_token_id]


def test_byte_level_bytes_invert_gpt2_s_byte_map():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.SHIPPED_BASE)
    for text in ["Marta", " Velling", "港", "涛雅港", "\n\t x"]:
        tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert b"".join(decoding.byte_level_bytes(t) for t in tokens) == text.encode()
