import json
import math

import pytest

from knowlm_nb import ROOT, tiny
from knowlm_nb.tiny import ZooError

from conftest import write_jsonl

SMALL = dict(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             intermediate_size=128, max_position=128)


def test_same_seed_same_tokenizer_and_weights(tmp_path, tiny_corpus):
    a = tiny.build_zoo(tmp_path / "a", corpus_glob=tiny_corpus, seed=3, verbose=False, **SMALL)
    b = tiny.build_zoo(tmp_path / "b", corpus_glob=tiny_corpus, seed=3, verbose=False, **SMALL)
    c = tiny.build_zoo(tmp_path / "c", corpus_glob=tiny_corpus, seed=4, verbose=False, **SMALL)
    assert a.manifest["tokenizer_sha256"] == b.manifest["tokenizer_sha256"]
    assert (a.tokenizer_dir / "tokenizer.json").read_bytes() == (b.tokenizer_dir / "tokenizer.json").read_bytes()
    assert a.manifest["weights_sha256"] == b.manifest["weights_sha256"]
    assert tiny.weights_hash(a.model_dir) == a.manifest["weights_sha256"]
    # another seed: same tokenizer (its training has no randomness), other weights
    assert c.manifest["tokenizer_sha256"] == a.manifest["tokenizer_sha256"]
    assert c.manifest["weights_sha256"] != a.manifest["weights_sha256"]


def test_zoo_is_cached_until_the_recipe_changes(tmp_path, tiny_corpus):
    out = tmp_path / "zoo"
    tiny.build_zoo(out, corpus_glob=tiny_corpus, verbose=False, **SMALL)
    stamp = (out / "base" / "model.safetensors").stat().st_mtime_ns
    tiny.build_zoo(out, corpus_glob=tiny_corpus, verbose=False, **SMALL)
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    z = tiny.build_zoo(out, corpus_glob=tiny_corpus, verbose=False, **{**SMALL, "num_layers": 1})
    assert z.manifest["recipe"]["num_layers"] == 1
    tok, model = z.load()
    assert model.config.num_hidden_layers == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".build-")]


def test_loaded_zoo_has_llama_specials_and_architecture(tmp_path, tiny_corpus):
    tok, model = tiny.build_zoo(tmp_path, corpus_glob=tiny_corpus, verbose=False, **SMALL).load()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert model.config.vocab_size == len(tok) <= SMALL["vocab_size"]
    assert model.config.eos_token_id == tok.eos_token_id


def test_default_tiny_model_has_a_few_million_parameters(tiny_corpus):
    tok = tiny.train_tokenizer(tiny.iter_texts(tiny.corpus_files(tiny_corpus)), 2000)
    model = tiny.build_model(tiny.model_config(tok))
    n = tiny.count_parameters(model)
    assert 1_000_000 < n < 10_000_000
    assert sum(tiny.parameter_breakdown(model).values()) == n
    # untrained: loss close to ln(V)
    loss = tiny.mean_loss(model, tok, ["Marie Curie was born in Warsaw.", "北京是中国的首都。"])
    assert abs(loss - math.log(len(tok))) < 0.5


ROUND_TRIP = [
    "Marie Curie was born in Warsaw in 1867; Dr. J. J. Thomson found the electron.",
    "北京是中华人民共和国的首都。“你好！”他说……（见下文。）《红楼梦》",
    "def area(r):\n\treturn 3.14159 * r ** 2\n\n\nclass A:\n    pass\n",
    "  leading and trailing spaces  ", "CRLF\r\nline\r\n", "emoji 🚀🧪 and ☃",
    "mixed 中文 and English 混排 3.5 万", "zero\u200bwidth and e\u0301 combining", "",
    "SELECT name FROM users WHERE id = 42; -- sql", "x" * 3000,
]


@pytest.fixture(scope="module")
def shipped_tokenizer():
    files = tiny.corpus_files("data_samples/corpus/*.jsonl")
    return tiny.train_tokenizer(tiny.iter_texts(files), 2000), files


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_text_exactly(shipped_tokenizer, text):
    tok, _ = shipped_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_tokenizer_round_trips_every_sample_document(shipped_tokenizer):
    tok, files = shipped_tokenizer
    langs = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            langs.add(rec["lang"])
            ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == rec["text"], rec.get("id")
    assert {"zh", "en", "code"} <= langs


def test_chinese_costs_more_tokens_with_an_english_centric_vocabulary(shipped_tokenizer):
    tok, files = shipped_tokenizer
    zh = list(tiny.iter_texts(files, ["zh"]))
    en_code = list(tiny.iter_texts(files, ["en", "code"]))
    english_centric = tiny.train_tokenizer(en_code, 2000)
    ours, theirs = tiny.tokens_per_char(tok, zh), tiny.tokens_per_char(english_centric, zh)
    assert theirs > 1.3 * ours
    assert tiny.tokens_per_char(tok, en_code) < 0.5  # English and code compress well


# ------------------------------------------------------------------ bad input

def test_empty_corpus_is_an_error(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", [{"text": "   ", "lang": "en"}])
    with pytest.raises(ZooError, match="empty corpus"):
        tiny.build_zoo(tmp_path / "out", corpus_glob=str(tmp_path / "*.jsonl"), verbose=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ZooError, match="no corpus files match"):
        tiny.build_zoo(tmp_path / "out", corpus_glob=str(tmp_path / "none*.jsonl"))


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "ok"}\n{not json}\n', "bad.jsonl:2: not JSON"),
    ('{"text": 5}\n', "bad.jsonl:1: no string 'text'"),
    ('["a list"]\n', "bad.jsonl:1: no string 'text'"),
])
def test_malformed_corpus_names_file_and_line(tmp_path, line, fragment):
    (tmp_path / "bad.jsonl").write_text(line)
    with pytest.raises(ZooError, match=fragment):
        tiny.build_zoo(tmp_path / "out", corpus_glob=str(tmp_path / "*.jsonl"), verbose=False)


def test_invalid_utf8_is_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ZooError, match="bad.jsonl:2: invalid UTF-8"):
        list(tiny.iter_texts([tmp_path / "bad.jsonl"]))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"vocab_size": 100}, "vocab_size must be"),
    ({"vocab_size": "2000"}, "vocab_size must be"),
    ({"min_frequency": 0}, "min_frequency"),
    ({"hidden_size": 100, "num_heads": 8}, "not divisible by num_heads"),
    ({"num_heads": 8, "num_kv_heads": 3}, "not divisible by num_kv_heads"),
    ({"num_layers": 0}, "num_layers must be a positive int"),
    ({"depth": 3}, "unknown model setting"),
])
def test_bad_settings_fail_and_leave_nothing_half_written(tmp_path, tiny_corpus, kwargs, fragment):
    out = tmp_path / "out"
    with pytest.raises(ZooError, match=fragment):
        tiny.build_zoo(out, corpus_glob=tiny_corpus, verbose=False, **{**SMALL, **kwargs})
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert leftovers == []


def test_cli_builds_and_reports_errors(tmp_path, capsys):
    assert tiny.main(["--out", str(tmp_path / "z"), "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_cli_builds_the_profile_zoo(tmp_path, capsys):
    assert tiny.main(["--out", str(tmp_path / "z"), "--seed", "1"]) == 0
    manifest = json.loads((tmp_path / "z" / "zoo.json").read_text())
    assert manifest["recipe"]["seed"] == 1 and manifest["vocab_size"] <= 2000
    assert manifest["weights_sha256"] in capsys.readouterr().out


def test_show_tokens_pieces_add_up_to_the_text(shipped_tokenizer):
    tok, _ = shipped_tokenizer
    for text in ROUND_TRIP[:7]:
        pieces = tiny.show_tokens(tok, text)
        raw = b"".join(bytes.fromhex(p[1:-1]) if p.startswith("<") and p.endswith(">")
                       and all(len(x) == 2 for x in p[1:-1].split()) else p.encode()
                       for p in pieces)
        assert raw == text.encode()
    assert any(p.startswith("<e") for p in tiny.show_tokens(tok, "麒麟"))


# ------------------------------------------------- the copy-capable base

def test_name_maker_invents_many_distinct_names_per_kind_and_language():
    maker = tiny.NameMaker(0)
    for lang in ("en", "zh"):
        for kind in tiny.NameMaker.KINDS:
            names = {maker.make(kind, lang) for _ in range(300)}
            assert len(names) > (100 if kind == "time" else 250), (kind, lang)
    assert tiny.NameMaker(5).make("person") == tiny.NameMaker(5).make("person")
    with pytest.raises(tiny.ZooError, match="unknown name kind 'animal'"):
        maker.make("animal")


def _time_shape(text: str) -> str:
    """A time with its swappable parts replaced by their kind: "14 July 2022" -> "# M #"."""
    import re

    text = re.sub(r"\d+", "#", text)
    text = re.sub(r"周[一二三四五六日天]", "周D", text)
    text = re.sub(r"[春夏秋冬](?=季|天|$)", "S", text)
    kinds = {**{m.lower(): "M" for m in tiny._MONTHS}, **{d.lower(): "D" for d in tiny._WEEKDAYS},
             **{s: "S" for s in tiny._SEASONS}}
    return re.sub(r"[A-Za-z]+", lambda m: kinds.get(m.group().lower(), m.group()), text)


def test_time_like_keeps_each_training_time_s_shape_and_is_fresh():
    from knowlm_nb import ie

    times = [e["text"] for lang in ("en", "zh") for rec in ie.split_records(lang)[0]
             for e in rec["entities"] if e["type"] == "time"]
    assert len(times) > 400 and {"Saturday", "2021", "周六", "2023年4月12日"} <= set(times)
    maker = tiny.NameMaker(0)
    fresh = [maker.time_like(t) for t in times]
    assert [_time_shape(t) for t in fresh] == [_time_shape(t) for t in times]
    assert sum(f != t for f, t in zip(fresh, times)) > 0.8 * len(times)
    assert len(set(fresh)) > 0.6 * len(fresh)
    again = tiny.NameMaker(0)
    assert [again.time_like(t) for t in times] == fresh  # a seed, the same times
    # the kept parts: a weekday stays a weekday, lower case stays lower case, a year keeps its side
    assert maker.time_like("Sunday evening").endswith(" evening")
    assert maker.time_like("spring 2025").split()[0] in tiny._SEASONS
    assert all(int(maker.time_like("1872")) < 1950 for _ in range(50))
    assert maker.time_like("下月初") == "下月初" and maker.time_like("春节") == "春节"


def test_copy_lines_repeat_their_names_and_follow_the_recipe_shares():
    lines = list(tiny.copy_lines(4000, seed=1))
    share = lambda pred: sum(map(pred, lines)) / len(lines)  # noqa: E731
    assert abs(share(lambda l: l.startswith("Repeat after me:")) - 0.10) < 0.02
    assert abs(share(lambda l: "Names mentioned:" in l) - 0.20) < 0.03
    assert abs(share(lambda l: "Where does" in l) - 0.15) < 0.03
    rep = next(l for l in lines if l.startswith("Repeat after me:"))
    x = rep[len("Repeat after me: "):].split(". ")[0]
    assert rep.count(x) == 2
    assert list(tiny.copy_lines(50, seed=1)) == lines[:50]
    # sentence_share takes that share of lines from the given sentences, and 0 changes nothing
    mixed = list(tiny.copy_lines(2000, seed=1, sentences=iter(["S."] * 2000), sentence_share=0.5))
    assert abs(mixed.count("S.") / len(mixed) - 0.5) < 0.04
    assert list(tiny.copy_lines(50, seed=1, sentences=iter([]), sentence_share=0.0)) == lines[:50]
    with pytest.raises(tiny.ZooError, match="sentences"):
        next(tiny.copy_lines(5, seed=1, sentence_share=0.5))


def test_induction_probe_separates_a_copying_model_from_an_untrained_one():
    tok, base = tiny.build_zoo(ROOT / "runs" / "tiny" / "00", verbose=False).load()
    untrained = tiny.build_model(base.config, seed=0)
    assert tiny.induction_probe(untrained, tok) > 5.0
    assert tiny.induction_probe(base, tok) < 3.0  # the shipped base copies (partly)


def test_zoo_uses_the_shipped_base_only_when_tokenizer_and_shape_match(tmp_path, tiny_corpus):
    default = tiny.build_zoo(ROOT / "runs" / "tiny" / "00", verbose=False)
    assert default.manifest["base"] == "copy-pretrained (shipped)"
    shipped = json.loads((tiny.SHIPPED_BASE / tiny.SHIPPED_RECIPE).read_text())
    assert default.manifest["recipe"]["shipped_base"]
    assert shipped["dims"] == {k: default.manifest["recipe"][k] for k in tiny.MODEL_KEYS}
    other = tiny.build_zoo(tmp_path / "z", corpus_glob=tiny_corpus, verbose=False, **SMALL)
    assert other.manifest["base"] == "random init"
    fresh = tiny.build_zoo(tmp_path / "r", verbose=False, use_shipped=False)
    assert fresh.manifest["base"] == "random init"
    assert fresh.manifest["tokenizer_sha256"] == shipped["tokenizer_sha256"]


def test_shipped_base_files_and_model_card():
    files = {p.name for p in tiny.SHIPPED_BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json", "README.md"} <= files
    info = json.loads((tiny.SHIPPED_BASE / "recipe.json").read_text())
    assert tiny.weights_hash(tiny.SHIPPED_BASE) == info["weights_sha256"]
    probes = [h["probe"] for h in info["history"]]
    assert probes[0] > 5.0 and probes[-1] < 3.0
    card = (tiny.SHIPPED_BASE / "README.md").read_text()
    assert "--pretrain-base data_samples/tiny_base" in card and f"{info['parameters']:,}" in card


def test_shipped_base_follows_the_recipe_in_the_code():
    info = json.loads((tiny.SHIPPED_BASE / "recipe.json").read_text())
    assert info["stages"] == tiny.COPY_STAGES
    assert info["history"][-1]["step"] == sum(s["steps"] for s in tiny.COPY_STAGES)


def test_copy_base_resumes_from_its_first_stages_only(tmp_path, tiny_corpus):
    zoo = tiny.build_zoo(tmp_path / "z", corpus_glob=tiny_corpus, verbose=False, **SMALL)
    stage = {"steps": 2, "batch_size": 2, "block": 32, "lr": 1e-3, "warmup": 0,
             "repeat_share": 0.5, "seed": 0, "probe_every": 1}
    first = tiny.ship_copy_base(tmp_path / "b1", zoo.root, [stage], progress=False)
    assert [h["step"] for h in first["history"]] == [0, 1, 2]
    both = [stage, dict(stage, seed=1)]
    info = tiny.ship_copy_base(tmp_path / "b2", zoo.root, both, progress=False, resume=tmp_path / "b1")
    assert [h["step"] for h in info["history"]] == [0, 1, 2, 3, 4]
    assert info["history"][:3] == first["history"]
    assert info["resumed"] == [{"from_stages": 1, "weights_sha256": first["weights_sha256"]}]
    assert info["weights_sha256"] != first["weights_sha256"]  # the second stage trained
    # a base whose stages are not the first part of the recipe cannot be resumed
    with pytest.raises(ZooError, match="cannot resume"):
        tiny.ship_copy_base(tmp_path / "b3", zoo.root, [dict(stage, lr=5e-3), stage],
                            progress=False, resume=tmp_path / "b1")
    assert not (tmp_path / "b3").exists()
    with pytest.raises(ZooError, match="no recipe.json"):
        tiny.ship_copy_base(tmp_path / "b3", zoo.root, both, progress=False, resume=tmp_path)
