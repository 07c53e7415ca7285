"""Stage 03: templates, prompt masking, the no-target guard, the mix, adapters."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from knowlm_nb import ROOT, ie, instruct, tiny


@pytest.fixture(scope="module")
def tok_and_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    zoo = tiny.build_zoo(out, verbose=False, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=4, intermediate_size=128)
    tok, model = zoo.load()
    return zoo, tok, model


# ---------------------------------------------------------------- templates

def test_templates_ship_in_the_package_and_load_from_any_directory(tmp_path):
    assert {"alpaca", "alpaca_short"} <= set(instruct.template_names())
    code = ("from knowlm_nb import instruct; t = instruct.load_template('alpaca'); "
            "print(t.prompt('Do it', 'x'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "### Instruction:\nDo it\n\n### Input:\nx\n\n### Response:\n" in out


def test_template_with_and_without_input():
    t = instruct.load_template("alpaca_short")
    assert t.prompt("Say hi") == "### Instruction:\nSay hi\n\n### Response:\n"
    assert "### Input:\nabc" in t.prompt("Say hi", "abc")
    assert t.response(t.prompt("Q") + " answer ") == "answer"


def test_unknown_template_is_named():
    with pytest.raises(instruct.InstructError, match="unknown prompt template 'nope'.*alpaca"):
        instruct.load_template("nope")


# ---------------------------------------------------------------- masking

def test_prompt_tokens_are_masked_and_response_plus_eos_are_labels(tok_and_model):
    _, tok, _ = tok_and_model
    t = instruct.load_template("alpaca_short")
    ex = {"instruction": "List the names.", "input": "Ann met Bob.", "output": "Ann, Bob"}
    row = instruct.tokenize_example(tok, ex, t, cutoff_len=512)
    prompt_ids = tok(t.prompt(ex["instruction"], ex["input"]))["input_ids"]
    answer_ids = tok(ex["output"], add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert row["input_ids"] == prompt_ids + answer_ids + [tok.eos_token_id]
    assert row["input_ids"][0] == tok.bos_token_id
    assert row["labels"][:n] == [-100] * n
    assert row["labels"][n:] == answer_ids + [tok.eos_token_id]
    assert tok.decode(row["labels"][n:-1]) == "Ann, Bob"
    assert not row["truncated"]
    full = instruct.tokenize_example(tok, ex, t, cutoff_len=512, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]


def test_truncation_is_counted_and_promptonly_examples_dropped(tok_and_model):
    _, tok, _ = tok_and_model
    t = instruct.load_template("alpaca_short")
    long_prompt = {"instruction": "word " * 300, "input": "", "output": "yes"}
    short = {"instruction": "Say yes.", "input": "", "output": "yes"}
    rows, stats = instruct.tokenize_all(tok, [long_prompt, short], t, cutoff_len=64)
    assert stats == {**stats, "examples": 2, "kept": 1, "truncated": 1, "dropped_no_target": 1}
    assert all(len(r["input_ids"]) <= 64 for r in rows)


def test_bad_example_and_cutoff_are_rejected(tok_and_model):
    _, tok, _ = tok_and_model
    t = instruct.load_template("alpaca_short")
    with pytest.raises(instruct.InstructError, match="'output' must be a string"):
        instruct.tokenize_example(tok, {"instruction": "x", "output": None}, t, 64)
    with pytest.raises(instruct.InstructError, match="cutoff_len"):
        instruct.tokenize_example(tok, {"instruction": "x", "output": "y"}, t, 1)


def test_a_batch_without_targets_is_an_error_that_says_why(tok_and_model):
    _, tok, _ = tok_and_model
    collate = instruct.MaskedCollator(tok)
    good = {"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, -100, 6]}
    empty = {"input_ids": [1, 5], "attention_mask": [1, 1], "labels": [-100, -100]}
    batch = collate([good, empty])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 5, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, -100, 6], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(instruct.NoTargetError, match="no trainable target token"):
        collate([empty, empty])


# ---------------------------------------------------------------- the mix

def test_mix_counts_follow_knowlm_proportions():
    counts = instruct.mix_counts(1000)
    assert sum(counts.values()) == 1000
    total = sum(instruct.KNOWLM_COUNTS.values())
    for cat, n in counts.items():
        assert abs(n / 1000 - instruct.KNOWLM_COUNTS[cat] / total) < 0.001 + 1 / 1000
    assert counts["ie_en"] > counts["ie_zh"] > counts["cot"] > counts["general"] > counts["code"]
    with pytest.raises(instruct.InstructError, match="unknown categories"):
        instruct.mix_counts(100, {"poetry": 1.0})


def test_build_mix_proportions_split_and_fresh_names():
    train, val, counts = instruct.build_mix(2000, seed=1, val_share=0.1)
    assert len(train) + len(val) == 2000 and len(val) == 200
    seen = {c: 0 for c in instruct.CATEGORIES}
    for row in train + val:
        seen[row["category"]] += 1
    assert seen == counts
    # IE examples are mostly fresh-name copies, and never use an evaluation name
    banned = set()
    for lang in ("en", "zh"):
        banned |= set().union(*(ie.names_of(r) for r in ie.split_records(lang)[1]))
    ie_rows = [r for r in train + val if r["category"].startswith("ie_")]
    assert not any(name in r["input"] for r in ie_rows for name in banned)
    assert len({r["input"] for r in ie_rows}) > 0.8 * len(ie_rows)
    tasks = [r["task"] for r in ie_rows]
    assert tasks.count("NER") > 0.5 * len(tasks)  # NER weighted 3:1:1 over RE and EE
    assert tasks.count("RE") > 0.05 * len(tasks) and tasks.count("EE") > 0.05 * len(tasks)
    again = instruct.build_mix(2000, seed=1, val_share=0.1)
    assert again[0] == train  # deterministic
    # names built from words: still no held-out name, and no word only held-out names have
    words_train, _, _ = instruct.build_mix(1000, seed=1, val_share=0.0, names="words")
    held_out_words = instruct.name_maker("words", 0).banned
    for r in words_train:
        if r["category"].startswith("ie_"):
            assert not any(name in r["input"] for name in banned)
            assert not {w.lower() for w in re.findall(r"[A-Za-z]+", r["input"])} & held_out_words
    with pytest.raises(instruct.InstructError, match="name style"):
        instruct.build_mix(100, names="emoji")


def test_copy_instructions_list_fresh_names_in_order():
    rows = instruct.copy_instructions(40, seed=2)
    assert len(rows) == 40 and sum(r["lang"] == "zh" for r in rows) == 20
    banned = set().union(*(ie.names_of(r) for lang in ("en", "zh") for r in ie.split_records(lang)[1]))
    for r in rows:
        sep = ", " if r["lang"] == "en" else "，"
        names = r["output"].split(sep)
        positions = [r["input"].find(n) for n in names]
        assert min(positions) >= 0 and positions == sorted(positions)
        assert not any(b in r["input"] for b in banned)
    train, _, counts = instruct.build_mix(2000, seed=1, val_share=0.0, copy_share=0.5)
    general = [r for r in train if r["category"] == "general"]
    assert len(general) == counts["general"]
    assert sum(r.get("task") == "COPY" for r in general) == round(counts["general"] * 0.5)
    with pytest.raises(instruct.InstructError, match="copy_share"):
        instruct.build_mix(100, copy_share=1.5)


def test_mention_lines_list_names_of_training_sentences_never_held_out_ones():
    lines = list(itertools.islice(instruct.mention_lines(seed=5), 1500))  # over 2 passes
    banned = set().union(*(ie.names_of(r) for lang in ("en", "zh") for r in ie.split_records(lang)[1]))
    train_texts = {r["text"] for lang in ("en", "zh") for r in ie.split_records(lang)[0]}
    zh = 0
    for line in lines:
        lang = "zh" if "文中提到的名字：" in line else "en"
        zh += lang == "zh"
        cue, sep, end = tiny.MENTION_CUES[lang]
        text, names = line.split(cue)
        names = names.removesuffix(end).split(sep)
        positions = [text.find(n) for n in names]
        assert min(positions) >= 0 and positions == sorted(positions), line
        assert not any(b in line for b in banned), line
    assert 0.4 < zh / len(lines) < 0.6
    # the first use of a sentence is as written, later ones have fresh names
    as_written = sum(line.split(" Names mentioned: ")[0].split("文中提到的名字：")[0] in train_texts
                     for line in lines)
    assert 0.3 * len(lines) < as_written < 0.6 * len(lines)  # 644 sentences in one pass
    assert list(itertools.islice(instruct.mention_lines(seed=5), 1500)) == lines


def test_copy_instructions_do_not_depend_on_the_hash_seed():
    code = ("import json; from knowlm_nb import instruct; "
            "print(json.dumps(instruct.copy_instructions(200, seed=3), ensure_ascii=False))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2", "3")}
    assert len(outs) == 1 and len(json.loads(outs.pop())) == 200


def test_word_names_look_like_names_and_avoid_held_out_words():
    maker = instruct.name_maker("words", seed=4)
    held_out = maker.banned
    assert {"harrowgate", "pinwhistle", "stanhope"} <= held_out  # words only held-out names have
    made = {kind: [maker.make(kind) for _ in range(300)] for kind in maker.KINDS}
    for kind, names in made.items():
        assert len(set(names)) > (0.3 if kind == "time" else 0.9) * len(names), kind
        for name in names:
            assert not {w.lower() for w in re.findall(r"[A-Za-z]+", name)} & held_out, name
    # built from ordinary words: far more of their words are, or start with, a corpus word
    syllables = tiny.NameMaker(4)
    corpus = set(maker.words) | {t.lower() for t in instruct._EN_ORG_TAIL + instruct._EN_PLACE_TAIL}

    def corpus_share(names):
        parts = [w.lower() for n in names for w in re.findall(r"[A-Za-z]+", n)]
        return sum(any(w[:k] in corpus for k in range(3, len(w) + 1)) for w in parts) / len(parts)
    for kind in ("person", "location", "organization", "product"):
        assert corpus_share(made[kind]) > corpus_share([syllables.make(kind) for _ in range(300)]) + 0.15, kind
    words_org = made["organization"]
    assert any(n.endswith(("Media", "Trust", "Dairy")) for n in words_org)
    zh = [maker.make("organization", "zh") for _ in range(200)]
    assert all(not n[0].isascii() for n in zh) and len(set(zh)) > 180
    # Chinese: no character and no name ending that only held-out names contain
    train_zh, eval_zh = ie.split_records("zh")
    visible = "".join(r["text"] for p in sorted((ROOT / "data_samples" / "corpus").glob("zh_*.jsonl"))
                      for _, r in tiny.iter_jsonl(p)) + "".join(r["text"] for r in train_zh)
    held_only = {c for r in eval_zh for n in ie.names_of(r) for c in n} - set(visible)
    assert {"磐", "翼", "鸢"} <= held_only
    zh_all = [maker.make(kind, "zh") for kind in maker.KINDS for _ in range(300)]
    assert not set("".join(zh_all)) & held_only
    assert "医药" not in "".join(zh_all) and "医药" not in visible  # an ending only held-out names use
    again = instruct.name_maker("words", seed=4)
    assert [again.make(kind) for kind in maker.KINDS for _ in range(300)] == \
        [n for kind in maker.KINDS for n in made[kind]]  # a seed gives the same names
    with pytest.raises(instruct.InstructError, match="name style"):
        instruct.name_maker("emoji", 0)


def test_substitute_names_renames_consistently():
    rec = {"id": "t", "lang": "en",
           "text": "Harrowgate Institute hired Ann Lee; Ann Lee moved to Harrowgate.",
           "entities": [{"type": "organization", "text": "Harrowgate Institute"},
                        {"type": "person", "text": "Ann Lee"},
                        {"type": "location", "text": "Harrowgate"}],
           "relations": [{"head": "Ann Lee", "relation": "works_for", "tail": "Harrowgate Institute"}],
           "events": []}
    new = ie.substitute_names(rec, tiny.NameMaker(3))
    ie.check_record(new)
    names = [e["text"] for e in new["entities"]]
    assert not set(names) & {"Harrowgate Institute", "Ann Lee", "Harrowgate"}
    assert new["text"].count(names[1]) == 2
    assert new["relations"][0] == {"head": names[1], "relation": "works_for", "tail": names[0]}


def test_substitute_names_keeps_a_time_s_shape_unless_told_not_to():
    rec = {"id": "t", "lang": "zh", "text": "韩立冬周六在宁川开业，2023年4月12日扩建。",
           "entities": [{"type": "person", "text": "韩立冬"}, {"type": "time", "text": "周六"},
                        {"type": "location", "text": "宁川"}, {"type": "time", "text": "2023年4月12日"}],
           "relations": [], "events": []}
    for seed in range(20):
        new = ie.substitute_names(rec, tiny.NameMaker(seed))
        times = [e["text"] for e in new["entities"] if e["type"] == "time"]
        assert re.fullmatch(r"周[一二三四五六日]", times[0]) and re.fullmatch(r"\d{4}年\d{1,2}月\d{1,2}日", times[1])
        assert all(t in new["text"] for t in times)
        dated = ie.substitute_names(rec, tiny.NameMaker(seed), time_shape=False)
        assert all(re.fullmatch(r"\d{4}年\d{1,2}月", e["text"])
                   for e in dated["entities"] if e["type"] == "time")


def test_tuning_data_has_shaped_times_and_mention_lines_keep_dated_ones(monkeypatch):
    # fresh tuning examples, after the first pass over the sentences: times in many shapes
    fresh = instruct.fresh_ie_examples("zh", 1000, seed=0, task_weights={"NER": 1, "RE": 0, "EE": 0})
    late = [p for ex in fresh[400:] for p in re.findall(r"\(时间, ([^)]*)\)", ex["output"])]
    assert len(late) > 300
    assert sum(bool(re.fullmatch(r"周[一二三四五六日]", t)) for t in late) > 0.05 * len(late)
    assert sum(bool(re.fullmatch(r"\d{4}年", t)) for t in late) > 0.1 * len(late)
    # the shipped base's fifth stage was built from NameMaker dates (recipe.json): the
    # pretraining lines keep them, so they stay the lines that base was trained on
    asked = []
    real = instruct._fresh_records

    def spy(*args, **kwargs):
        asked.append(kwargs.get("as_shipped_base", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(instruct, "_fresh_records", spy)
    next(instruct.mention_lines(0))
    assert asked == [True, True]


def test_mention_lines_are_still_the_lines_of_the_base_recipe():
    """The fifth stage of COPY_STAGES (seed 4) trains on these lines. Their digest is pinned
    so that a change to the fresh-name code, the IE sentences or the corpus words shows up
    here: the shipped base's recipe would no longer rebuild it (rebuild and ship it anew, or
    keep the old lines). Pinned 2026-12-01, equal to what commit 92a230b made."""
    import hashlib

    lines = list(itertools.islice(instruct.mention_lines(4), 2000))
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == \
        "46ed36de31033498fc22b69895c0151f03c0673a951ed84b7128bae05c395a00"


def test_substitute_names_renames_names_inside_longer_spans():
    """An event argument such as "fans of Rookwood Athletic" holds a name; it is renamed
    there too, so every training sentence gets fresh names (6 of 644 used to keep theirs)."""
    for lang in ("en", "zh"):
        train = ie.split_records(lang)[0]
        inside = [r for r in train if any(n in a["text"] and n != a["text"] for ev in r["events"]
                                          for a in ev["arguments"] for n in ie.names_of(r))]
        assert len(inside) >= 3, lang
        maker = tiny.NameMaker(0)
        for rec in train:
            new = ie.substitute_names(rec, maker)
            ie.check_record(new)
            assert new["text"] != rec["text"], rec["text"]
            assert not any(n in new["text"] for n in ie.names_of(rec) if len(n) > 3), rec["text"]
        kept = [r for r in inside if ie.substitute_names(r, maker, rename_inside=False) == r]
        assert kept, "the whole-span renaming (shipped base) keeps such a record as written"


# ---------------------------------------------------------------- scoring

def test_score_ner_exact_partial_type_and_well_formed():
    ex = [{"gold": [{"type": "person", "text": "Marta Velling"}, {"type": "location", "text": "Port Elsin"}]},
          {"gold": []},
          {"gold": [{"type": "organization", "text": "江澜湖研究所"}]}]
    preds = ["(person, Marta Velling), (location, Elsin)", "NONE", "(组织, 江澜湖研究"]
    s = ie.score_ner(preds, ex)
    assert s["predicted"] == 2 and s["gold"] == 3
    assert s["exact"]["precision"] == pytest.approx(1 / 2)
    assert s["exact"]["recall"] == pytest.approx(1 / 3)
    assert s["type"]["precision"] == pytest.approx(1.0)
    # "Elsin" vs "Port Elsin": overlap F1 2/3
    assert s["partial"]["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["well_formed"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 examples"):
        ie.score_ner(preds[:2], ex)


def test_parse_ner_maps_chinese_labels_and_flags_garbage():
    assert ie.parse_ner("(人物, 林书远), (时间, 2016年)") == (
        [("person", "林书远"), ("time", "2016年")], True)
    assert ie.parse_ner("无") == ([], True)
    assert ie.parse_ner("(animal, cat)") == ([], False)
    assert ie.parse_ner("(person, Ann) and more") == ([("person", "Ann")], False)


# ---------------------------------------------------------------- generation + adapters

def test_generate_batched_left_padding_matches_one_by_one(tok_and_model):
    _, tok, model = tok_and_model
    prompts = ["Hello there", "A much longer prompt than the first one, with more words"]
    side = tok.padding_side
    batched = instruct.generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    single = [instruct.generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == side  # restored
    with pytest.raises(instruct.InstructError, match="max_new_tokens"):
        instruct.generate(model, tok, prompts, max_new_tokens=0)



def test_ner_grammar_takes_labels_and_copied_spans_only():
    g = instruct._NerGrammar("Marta Velling joined Harrowgate Institute (HI) in 2019.",
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
    zh = instruct._NerGrammar("2019年1月，武装分子袭击了涛雅港附近", ["人物", "地点", "时间"], "无")
    assert zh.complete(zh.feed(zh.START, "(时间, 2019年1月), (地点, 涛雅港)".encode()))
    assert zh.feed(zh.START, "(地点, 涛雅港口)".encode()) is None
    # a broken character: the first two bytes of 港 are in the text, 港's start + 口's end is not
    assert zh.feed(zh.START, "(地点, 涛雅".encode() + "港".encode()[:2]) is not None
    assert zh.feed(zh.START, "(地点, 涛雅".encode() + "港".encode()[:2] + "口".encode()[2:]) is None
    assert zh.feed(zh.START, "(地点, ".encode() + "涛".encode()[1:]) is None  # nor start inside one
    # a span does not cut a word: it starts and ends where a word does (or on a
    # CJK character, which has no word breaks); whole_words=False allows the cut
    en = "Nadia Sorel-Hahn played with the Ellesmere Philharmonic in 2021."
    ww, cut = (instruct._NerGrammar(en, ["person", "organization", "time"], "NONE", whole_words=w)
               for w in (True, False))
    for answer, whole in [("(organization, Ellesmere Philharmonic)", True),
                          ("(person, Hahn)", True), ("(time, 2021)", True),
                          ("(organization, Ellesmere Philhar)", False), ("(person, adia Sorel)", False),
                          ("(time, 202)", False)]:
        assert (ww.feed(ww.START, answer.encode()) is not None) == whole, answer
        assert cut.complete(cut.feed(cut.START, answer.encode())), answer
    assert ww.feed(ww.START, b"(organization, Ellesmere Philhar") is not None  # on its way to a whole word
    assert ww.feed(ww.START, b"(person, adia") is None
    mixed = instruct._NerGrammar("银燕X73于2023年发布。", ["产品", "时间"], "无")
    for answer, ok in [("(产品, 银燕X73)", True), ("(产品, 燕X73)", True), ("(时间, 2023)", True),
                       ("(时间, 2023年)", True), ("(产品, 银燕X7)", False), ("(时间, 023年)", False)]:
        assert (mixed.feed(mixed.START, answer.encode()) is not None) == ok, answer


def test_copy_errors_count_invented_names_and_cut_words():
    examples = [{"input": "Nadia Sorel-Hahn played with the Ellesmere Philharmonic in 2021.", "lang": "en"},
                {"input": "银燕X73于2023年发布。", "lang": "zh"}]
    preds = ["(person, Nadia Sorel-Hahn), (person, Hahn), (organization, Ellesmere Philhar), "
             "(organization, Ellesmere Phil), (person, Nadia Sorel-Hahm), (time, 2021)",
             "(产品, 燕X7), (时间, 2023年), (地点, 北京)"]
    assert instruct.copy_errors(preds, examples) == {"pairs": 9, "not_in_text": 2, "cut_words": 3}
    assert instruct.copy_errors(["NONE", "无"], examples) == {"pairs": 0, "not_in_text": 0, "cut_words": 0}
    with pytest.raises(ValueError):
        instruct.copy_errors(preds[:1], examples)  # one prediction per example


def test_copy_constrained_decoding_keeps_even_a_random_model_in_the_grammar(tok_and_model):
    _, tok, model = tok_and_model
    examples = instruct.eval_examples()[:4] + instruct.eval_examples(langs=("zh",))[:4]
    template = instruct.load_template("alpaca_short")
    cap = 40
    _, free_scores = instruct.evaluate_ner(model, tok, examples, template, cap, batch_size=3)
    held, scores = instruct.evaluate_ner(model, tok, examples, template, cap, batch_size=3,
                                         copy_constrained=True, num_beams=3)
    assert free_scores["well_formed"] == 0.0  # untrained: never the answer format on its own
    for out, ex in zip(held, examples):
        grammar = instruct._NerGrammar.for_example(ex)
        # an answer cut by the cap may end inside a character, which decodes as U+FFFD
        assert grammar.feed(grammar.START, out.rstrip("\ufffd").encode()) is not None, out
        pairs, _ = ie.parse_ner(out)
        assert all(name in ex["input"] for _, name in pairs), out
    assert scores["predicted"] > 0  # pairs, not only NONE
    with pytest.raises(instruct.InstructError, match="num_beams"):
        instruct.generate(model, tok, ["x"], num_beams=0)


@pytest.mark.parametrize("added", [[], ["远", "航", "智能", "Marta"]])
def test_copy_constraint_allows_exactly_the_tokens_that_stay_in_the_grammar(added):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.SHIPPED_BASE)
    tok.add_tokens(added)  # a vocabulary extension: added tokens stand for their own text
    examples = [{"input": "Marta Velling joined Harrowgate Institute in 2019.", "lang": "en"},
                {"input": "远航科技于2022年3月收购翼展智能。", "lang": "zh"}]
    allowed = instruct.ner_copy_constraint(tok, examples)(0, 0)
    vocab = instruct._vocabulary_bytes(tok)
    assert {vocab[tok.convert_tokens_to_ids(t)] for t in added} == {t.encode() for t in added}
    for row, answer, complete in [(0, "", False), (0, "(per", False), (0, "(person, Mar", False),
                                  (0, "(person, Marta Velling)", True), (0, "NONE", True),
                                  (1, "(组织, 远航", False), (1, "(组织, 远航科技), (时间, 2022年3月)", True)]:
        ids = torch.tensor(tok(answer, add_special_tokens=False)["input_ids"], dtype=torch.long)
        grammar = instruct._NerGrammar.for_example(examples[row])
        state = grammar.feed(grammar.START, answer.encode())
        brute = {i for i, data in vocab.items() if grammar.feed(state, data) is not None}
        got = allowed(row, ids)
        assert set(got) - {tok.eos_token_id} == brute, answer  # the trie walk misses none, adds none
        assert (tok.eos_token_id in got) == complete, answer
    assert tok.convert_tokens_to_ids("Ġthe") not in allowed(0, torch.tensor([], dtype=torch.long))
    # once EOS is out, only EOS (the row is finished)
    assert allowed(0, torch.tensor([tok.eos_token_id])) == [tok.eos_token_id]

def test_repeat_rate_counts_exact_copies_only(monkeypatch):
    from transformers import AutoTokenizer

    outs = {"Marta Velling": "Marta Velling. Marta", "远航科技": "远航科技",
            "Cobalt Ridge": "Cobaloun Ridge."}
    monkeypatch.setattr(instruct, "generate", lambda model, tok, prompts, max_new_tokens, batch_size: [
        outs[p[len("Repeat after me: "):-1]] for p in prompts])
    tok = AutoTokenizer.from_pretrained(tiny.SHIPPED_BASE)
    assert instruct.repeat_rate(None, tok, list(outs)) == pytest.approx(2 / 3)
    with pytest.raises(instruct.InstructError, match="no names"):
        instruct.repeat_rate(None, tok, [])


def _reloads_to_the_same_logits(model, tok, base_dir, adapter_dir):
    """Load ``adapter_dir`` on a fresh base: the logits must equal the trained model's."""
    ids = tok(["Name 3"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        want = model(**ids).logits
    _, loaded = instruct.load_adapter(base_dir, adapter_dir)
    with torch.no_grad():
        got = loaded(**ids).logits
    torch.testing.assert_close(got, want)
    return loaded


def test_adapter_is_saved_non_empty_and_loads_back_to_the_same_outputs(tok_and_model, tmp_path):
    zoo, tok, _ = tok_and_model
    _, base = instruct.load_base(zoo.model_dir)
    model = instruct.lora_model(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    t = instruct.load_template("alpaca_short")
    ex = [{"instruction": "Repeat the name.", "input": f"Name {i}", "output": f"Name {i}"}
          for i in range(16)]
    rows, _ = instruct.tokenize_all(tok, ex, t, cutoff_len=64)
    res = instruct.train_lora(model, tok, rows, rows[:4], tmp_path / "adapter", learning_rate=1e-2,
                              max_steps=4, micro_batch=4, warmup_steps=0, eval_steps=2,
                              progress=False)
    assert res["steps"] == 4
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_lora == 2 * 2 * (4 * 64 + 64 * 4)  # 2 layers x (q, v) x (A + B)
    assert res["adapter_bytes"] >= 4 * n_lora  # every fp32 LoRA weight is on disk
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not empty
    curves = instruct.loss_curves(res["history"])
    assert len(curves["train"]) >= 1 and len(curves["validation"]) == 2
    _reloads_to_the_same_logits(model, tok, zoo.model_dir, tmp_path / "adapter")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no scratch left


def test_modules_to_save_train_whole_and_come_back_with_the_adapter(tok_and_model, tmp_path):
    zoo, tok, _ = tok_and_model
    _, base = instruct.load_base(zoo.model_dir)
    head_before = base.lm_head.weight.detach().clone()
    n_whole = base.get_input_embeddings().weight.numel() + head_before.numel()
    model = instruct.lora_model(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                modules_to_save=["embed_tokens", "lm_head"])
    n_lora = 2 * 2 * (4 * 64 + 64 * 4)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_lora + n_whole
    t = instruct.load_template("alpaca_short")
    ex = [{"instruction": "Repeat the name.", "input": f"Name {i}", "output": f"Name {i}"} for i in range(8)]
    rows, _ = instruct.tokenize_all(tok, ex, t, cutoff_len=64)
    res = instruct.train_lora(model, tok, rows, [], tmp_path / "adapter", learning_rate=1e-2,
                              max_steps=2, micro_batch=4, warmup_steps=0, progress=False)
    assert res["adapter_bytes"] >= 4 * (n_lora + n_whole)  # the whole embeddings and head are saved
    loaded = _reloads_to_the_same_logits(model, tok, zoo.model_dir, tmp_path / "adapter")
    trained_head = loaded.base_model.model.lm_head.modules_to_save["default"].weight
    assert not torch.equal(trained_head, head_before)  # the head was trained, not only wrapped


def test_missing_base_or_adapter_is_named(tmp_path, tok_and_model):
    with pytest.raises(instruct.InstructError, match="no model at"):
        instruct.load_base(tmp_path)
    zoo, _, _ = tok_and_model
    with pytest.raises(instruct.InstructError, match="no LoRA adapter at"):
        instruct.load_adapter(zoo.model_dir, tmp_path)
    with pytest.raises(instruct.InstructError, match="CUDA"):
        if not torch.cuda.is_available():
            instruct.load_base(zoo.model_dir, load_in_8bit=True)
        else:
            raise instruct.InstructError("CUDA present: nothing to check")


def test_a_complete_adapter_of_the_same_training_is_reused_and_nothing_else(tok_and_model, tmp_path):
    zoo, tok, _ = tok_and_model
    t = instruct.load_template("alpaca_short")
    ex = [{"instruction": "Repeat the name.", "input": f"Name {i}", "output": f"Name {i}"} for i in range(8)]
    rows, _ = instruct.tokenize_all(tok, ex, t, cutoff_len=64)
    params = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "modules_to_save": ["lm_head"], "learning_rate": 1e-2, "epochs": 1.0, "max_steps": 2,
              "warmup_steps": 0, "micro_batch": 4, "grad_accum": 1, "load_in_8bit": False, "seed": 0}
    out = tmp_path / "adapter"

    def fresh():
        _, base = instruct.load_base(zoo.model_dir)
        return instruct.lora_model(base, params["lora_r"], params["lora_alpha"], params["lora_dropout"],
                                   params["target_modules"], modules_to_save=params["modules_to_save"])

    trained = fresh()
    first = instruct.train_or_reuse(trained, tok, zoo.model_dir, rows, rows[:4], out, params,
                                    reuse=True, eval_steps=1, progress=False)
    assert first["tuned"] and "no complete adapter" in first["note"] and first["steps"] == 2
    assert (out / instruct.TRAINING_RECORD).is_file()

    again = fresh()
    second = instruct.train_or_reuse(again, tok, zoo.model_dir, rows, rows[:4], out, params,
                                     reuse=True, progress=False)
    assert not second["tuned"] and "reused" in second["note"]
    assert second["history"] == first["history"] and second["steps"] == 2  # the saved record
    ids = tok(["Name 3"], return_tensors="pt")
    trained.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, trained(**ids).logits)  # LoRA and head loaded

    fp = instruct.training_fingerprint(zoo.model_dir, rows, params)
    assert instruct.reuse_refusal(out, fp) is None
    other = instruct.training_fingerprint(zoo.model_dir, rows, {**params, "learning_rate": 2e-2})
    assert "learning_rate: 0.01 then, 0.02 now" in instruct.reuse_refusal(out, other)
    assert "other examples" in instruct.reuse_refusal(out, instruct.training_fingerprint(
        zoo.model_dir, rows[:4], params))
    assert "another base" in instruct.reuse_refusal(out, {**fp, "base_weights": "0" * 64})
    record = json.loads((out / instruct.TRAINING_RECORD).read_text())
    (out / instruct.TRAINING_RECORD).write_text(json.dumps({**record, "adapter_sha256": "0" * 64}))
    assert "not the ones its training record names" in instruct.reuse_refusal(out, fp)
    (out / instruct.TRAINING_RECORD).unlink()
    assert "has no training.json" in instruct.reuse_refusal(out, fp)
    off = instruct.train_or_reuse(fresh(), tok, zoo.model_dir, rows, [], out, params, reuse=False,
                                  progress=False)
    assert off["tuned"] and off["note"] == "tuned now (reuse_adapter is off)"
    with pytest.raises(instruct.InstructError, match="lack"):
        instruct.training_fingerprint(zoo.model_dir, rows, {"lora_r": 4})


def test_a_record_that_is_not_one_is_refused_not_a_crash(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"x")
    fp = {"base_weights": "a", "train_rows": "b", "n_train_rows": 1, "settings": {"lora_r": 4}}
    for bad in ["not json", "[]", json.dumps({"fingerprint": [], "adapter_sha256": "x", "result": {"seconds": 1}}),
                json.dumps({"fingerprint": {"settings": None}, "adapter_sha256": "x", "result": {"seconds": 1}})]:
        (out / instruct.TRAINING_RECORD).write_text(bad)
        assert "is not a training record" in instruct.reuse_refusal(out, fp)
