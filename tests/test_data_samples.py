"""The committed sample data: sizes, schema, provenance and the held-out IE split."""
import json
from collections import Counter

import pytest

from knowlm_nb import ROOT, ie

DATA = ROOT / "data_samples"


def rows(rel):
    return [json.loads(line) for line in (DATA / rel).read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus():
    return [r for p in sorted((DATA / "corpus").glob("*.jsonl")) for r in rows(p.relative_to(DATA))]


def test_corpus_sizes_schema_and_languages():
    docs = corpus()
    by_lang = Counter(d["lang"] for d in docs)
    assert by_lang["zh"] >= 200 and by_lang["en"] >= 200 and by_lang["code"] >= 100
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        assert isinstance(d["text"], str) and len(d["text"]) > 100, d["id"]
        assert d["source"] == "knowlm-nb-authored"
    # real text, not repeated filler: documents are distinct and vocabularies are rich
    assert len({d["text"] for d in docs}) == len(docs)
    en_words = Counter(w.lower() for d in docs if d["lang"] == "en" for w in d["text"].split())
    assert len(en_words) > 8000
    zh_chars = {c for d in docs if d["lang"] == "zh" for c in d["text"] if "\u4e00" <= c <= "\u9fff"}
    assert len(zh_chars) > 1500


def test_total_size_is_small():
    files = [p for p in DATA.rglob("*") if p.is_file()]
    text = sum(p.stat().st_size for p in files if "tiny_base" not in p.parts)
    model = sum(p.stat().st_size for p in files if "tiny_base" in p.parts)
    assert text < 2.5 * 2**20
    assert 0 < model < 8 * 2**20  # 3.65M parameters in fp16 plus tokenizer and card


def test_instruction_categories_follow_knowlm():
    cats = {}
    for name in ("cot", "general", "code", "ie_en", "ie_zh"):
        data = rows(f"instructions/{name}.jsonl")
        assert data, name
        for r in data:
            assert r["category"] == name
            assert isinstance(r["instruction"], str) and r["instruction"]
            assert isinstance(r["input"], str) and isinstance(r["output"], str) and r["output"]
        cats[name] = len(data)
    tasks = Counter((r["lang"], r["task"]) for n in ("ie_en", "ie_zh") for r in rows(f"instructions/{n}.jsonl"))
    for lang in ("en", "zh"):
        for task in ("NER", "RE", "EE"):
            assert tasks[(lang, task)] >= 50, (lang, task)


def test_committed_ie_split_is_what_the_builder_produces():
    built = ie.build_samples(write=False)
    for rel, expected in built.items():
        assert rows(rel) == expected, f"{rel} is stale: run python -m knowlm_nb.ie build-samples"


def test_eval_names_never_appear_in_training_data():
    training = [d["text"] for d in corpus()]
    for name in ("cot", "general", "code", "ie_en", "ie_zh"):
        training += [r["instruction"] + "\n" + r["input"] + "\n" + r["output"]
                     for r in rows(f"instructions/{name}.jsonl")]
    haystack = "\n".join(training)
    n_names = 0
    for lang in ("en", "zh"):
        evaluation = rows(f"ie/eval_{lang}.jsonl")
        assert len({r["input"] for r in evaluation}) >= 40
        for r in evaluation:
            if r["task"] != "NER":
                continue
            for ent in r["gold"]:
                if ent["type"] != "time":
                    n_names += 1
                    assert ent["text"] not in haystack, (r["id"], ent["text"])
    assert n_names >= 150


def test_outputs_are_formatted_from_gold():
    rec = {"id": "t", "lang": "en", "text": "Ada Lind founded Quill Labs in Port Elsin.",
           "entities": [{"type": "person", "text": "Ada Lind"},
                        {"type": "organization", "text": "Quill Labs"},
                        {"type": "location", "text": "Port Elsin"}],
           "relations": [{"head": "Quill Labs", "relation": "founded_by", "tail": "Ada Lind"}],
           "events": [{"type": "Founding", "trigger": "founded",
                       "arguments": [{"role": "founder", "text": "Ada Lind"},
                                     {"role": "organization", "text": "Quill Labs"}]}]}
    out = {x["task"]: x["output"] for x in ie.to_instructions(rec)}
    assert out["NER"] == "(person, Ada Lind), (organization, Quill Labs), (location, Port Elsin)"
    assert out["RE"] == "(Quill Labs, founded_by, Ada Lind)"
    assert out["EE"] == "(Founding, founded, founder: Ada Lind; organization: Quill Labs)"
    zh = dict(rec, lang="zh", relations=[], events=[])
    assert ie.to_instructions(zh)[0]["output"].startswith("(人物, Ada Lind)")
    assert ie.format_output("RE", zh) == "无"


@pytest.mark.parametrize("patch, fragment", [
    ({"text": ""}, "no text"),
    ({"lang": "fr"}, "lang must be"),
    ({"entities": [{"type": "person", "text": "Nobody Here"}]}, "bad entity"),
    ({"entities": [{"type": "alien", "text": "Ada"}]}, "bad entity"),
    ({"relations": [{"head": "Ada", "relation": "born_in", "tail": "Mars"}]}, "bad relation"),
    ({"events": [{"type": "Party", "trigger": "met", "arguments": []}]}, "bad event"),
])
def test_malformed_annotations_are_rejected(patch, fragment):
    rec = {"id": "x", "lang": "en", "text": "Ada met Bo.", "entities": [{"type": "person", "text": "Ada"}]}
    rec.update(patch)
    with pytest.raises(ie.IEDataError, match=fragment):
        ie.check_record(rec)


def test_ie_builder_names_file_and_line_of_bad_input(tmp_path):
    from knowlm_nb.files import FilesError  # ie reads JSONL through files
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FilesError, match="c.jsonl:2: invalid UTF-8"):
        ie.build_samples(tmp_path, write=False)
    (tmp_path / "corpus" / "c.jsonl").write_text('{"text": "ok"}\n\n{oops\n')
    with pytest.raises(FilesError, match="c.jsonl:3: not JSON"):
        ie.build_samples(tmp_path, write=False)
