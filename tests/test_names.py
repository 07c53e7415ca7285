"""Synthetic names: syllable names, word names, times of the same shape, fresh-name records."""
import itertools
import re

import pytest

from knowlm_nb import ROOT, ie
from knowlm_nb import names as namegen
from knowlm_nb.files import iter_jsonl


def test_name_maker_invents_many_distinct_names_per_kind_and_language():
    maker = namegen.NameMaker(0)
    for lang in ("en", "zh"):
        for kind in namegen.NameMaker.KINDS:
            names = {maker.make(kind, lang) for _ in range(300)}
            assert len(names) > (100 if kind == "time" else 250), (kind, lang)
    assert namegen.NameMaker(5).make("person") == namegen.NameMaker(5).make("person")
    with pytest.raises(namegen.NamesError, match="unknown name kind 'animal'"):
        maker.make("animal")


def _time_shape(text: str) -> str:
    """A time with its swappable parts replaced by their kind: "14 July 2022" -> "# M #"."""
    text = re.sub(r"\d+", "#", text)
    text = re.sub(r"周[一二三四五六日天]", "周D", text)
    text = re.sub(r"[春夏秋冬](?=季|天|$)", "S", text)
    kinds = {**{m.lower(): "M" for m in namegen.MONTHS}, **{d.lower(): "D" for d in namegen.WEEKDAYS},
             **{s: "S" for s in namegen.SEASONS}}
    return re.sub(r"[A-Za-z]+", lambda m: kinds.get(m.group().lower(), m.group()), text)


def test_time_like_keeps_each_training_time_s_shape_and_is_fresh():
    times = [e["text"] for lang in ("en", "zh") for rec in ie.split_records(lang)[0]
             for e in rec["entities"] if e["type"] == "time"]
    assert len(times) > 400 and {"Saturday", "2021", "周六", "2023年4月12日"} <= set(times)
    maker = namegen.NameMaker(0)
    fresh = [maker.time_like(t) for t in times]
    assert [_time_shape(t) for t in fresh] == [_time_shape(t) for t in times]
    assert sum(f != t for f, t in zip(fresh, times)) > 0.8 * len(times)
    assert len(set(fresh)) > 0.6 * len(fresh)
    again = namegen.NameMaker(0)
    assert [again.time_like(t) for t in times] == fresh  # a seed, the same times
    # the kept parts: a weekday stays a weekday, lower case stays lower case, a year keeps its side
    assert maker.time_like("Sunday evening").endswith(" evening")
    assert maker.time_like("spring 2025").split()[0] in namegen.SEASONS
    assert all(int(maker.time_like("1872")) < 1950 for _ in range(50))
    assert maker.time_like("下月初") == "下月初" and maker.time_like("春节") == "春节"


def test_word_names_look_like_names_and_avoid_held_out_words():
    maker = namegen.name_maker("words", seed=4)
    held_out = maker.banned
    assert {"harrowgate", "pinwhistle", "stanhope"} <= held_out  # words only held-out names have
    made = {kind: [maker.make(kind) for _ in range(300)] for kind in maker.KINDS}
    for kind, names in made.items():
        assert len(set(names)) > (0.3 if kind == "time" else 0.9) * len(names), kind
        for name in names:
            assert not {w.lower() for w in re.findall(r"[A-Za-z]+", name)} & held_out, name
    # built from ordinary words: far more of their words are, or start with, a corpus word
    syllables = namegen.NameMaker(4)
    corpus = set(maker.words) | {t.lower() for t in namegen.ORG_TAILS + namegen.PLACE_TAILS}

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
                      for _, r in iter_jsonl(p)) + "".join(r["text"] for r in train_zh)
    held_only = {c for r in eval_zh for n in ie.names_of(r) for c in n} - set(visible)
    assert {"磐", "翼", "鸢"} <= held_only
    zh_all = [maker.make(kind, "zh") for kind in maker.KINDS for _ in range(300)]
    assert not set("".join(zh_all)) & held_only
    assert "医药" not in "".join(zh_all) and "医药" not in visible  # an ending only held-out names use
    again = namegen.name_maker("words", seed=4)
    assert [again.make(kind) for kind in maker.KINDS for _ in range(300)] == \
        [n for kind in maker.KINDS for n in made[kind]]  # a seed gives the same names
    with pytest.raises(namegen.NamesError, match="name style"):
        namegen.name_maker("emoji", 0)


def test_the_two_generators_share_their_word_lists():
    """NameMaker's lists are the older, shorter ones; each is part of WordNames' (stated once)."""
    assert set(namegen.SYLLABLE_PLACE_HEADS) <= set(namegen.PLACE_HEADS)
    assert set(namegen.SYLLABLE_ZH_ORG_TAILS) <= set(namegen.ZH_INDUSTRIES)
    assert namegen.ZH_PLACE_TAILS[:len(namegen.SYLLABLE_ZH_PLACE_TAILS)] == namegen.SYLLABLE_ZH_PLACE_TAILS
    assert namegen.SYLLABLE_ORG_TAILS[:8] == namegen.ORG_TAILS[:8]
    with pytest.raises(namegen.NamesError, match="not in the word list"):
        namegen.subset(["a", "b"], "a c")


def test_fresh_records_pass_once_as_written_then_rename_and_never_use_held_out_names():
    train, evaluation = ie.split_records("en")
    banned = set().union(*(ie.names_of(r) for r in evaluation))
    recs = list(itertools.islice(namegen.fresh_records("en", 0), 2 * len(train)))
    first, second = recs[:len(train)], recs[len(train):]
    assert sorted(r["id"] for r in first) == sorted(r["id"] for r in train)  # every sentence once
    assert all(r in train for r in first)  # as written
    written = {r["text"] for r in train}
    assert sum(r["text"] not in written for r in second) > 0.95 * len(second)  # renamed
    assert not any(b in r["text"] for r in second for b in banned)
    # ``rename`` is what renames: the identity keeps every record as written
    kept = list(itertools.islice(namegen.fresh_records("en", 0, rename=lambda rec, maker: rec),
                                 2 * len(train)))
    assert all(r["text"] in written for r in kept)
