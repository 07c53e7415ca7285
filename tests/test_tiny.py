import json
import math
import sys

import pytest

from knowlm_nb import ROOT, files, tiny
from knowlm_nb.files import FilesError
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
    assert files.weights_hash(a.model_dir) == a.manifest["weights_sha256"]
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
    tok = tiny.train_tokenizer(tiny.iter_texts(files.find_files(tiny_corpus)), 2000)
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
    corpus = files.find_files("data_samples/corpus/*.jsonl")
    return tiny.train_tokenizer(tiny.iter_texts(corpus), 2000), corpus


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
    with pytest.raises(FilesError, match="no files match"):
        tiny.build_zoo(tmp_path / "out", corpus_glob=str(tmp_path / "none*.jsonl"))


@pytest.mark.parametrize("line, error, fragment", [
    ('{"text": "ok"}\n{not json}\n', FilesError, "bad.jsonl:2: not JSON"),  # files reads the JSONL
    ('{"text": 5}\n', ZooError, "bad.jsonl:1: no string 'text'"),  # the zoo wants a text field
    ('["a list"]\n', ZooError, "bad.jsonl:1: no string 'text'"),
])
def test_malformed_corpus_names_file_and_line(tmp_path, line, error, fragment):
    (tmp_path / "bad.jsonl").write_text(line)
    with pytest.raises(error, match=fragment):
        tiny.build_zoo(tmp_path / "out", corpus_glob=str(tmp_path / "*.jsonl"), verbose=False)


def test_invalid_utf8_is_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FilesError, match="bad.jsonl:2: invalid UTF-8"):
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


# ------------------------------------------------- the shipped base

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


def test_pretrain_base_is_an_alias_of_the_copybase_command(tmp_path, monkeypatch):
    """``tiny --pretrain-base`` runs ``python -m knowlm_nb.copybase`` (which imports tiny:
    a subprocess, not an import, so the modules stay free of a cycle) and returns its code."""
    ran = []

    class Done:
        returncode = 7

    monkeypatch.setattr(tiny.subprocess, "run", lambda cmd: ran.append(cmd) or Done())
    assert tiny.main(["--out", str(tmp_path / "z"), "--pretrain-base", str(tmp_path / "b"),
                      "--steps", "5", "--force"]) == 7
    assert ran == [[sys.executable, "-m", "knowlm_nb.copybase", "--zoo", str(tmp_path / "z"),
                    "--out", str(tmp_path / "b"), "--profile", "tiny", "--steps", "5", "--force"]]
    assert not (tmp_path / "z").exists()  # the zoo is copybase's to build


def test_zoo_files_are_readable_by_group_and_others_under_a_022_umask(tmp_path, tiny_corpus):
    """save_pretrained writes model.safetensors 0600; the zoo's atomic folders widen it to the umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        zoo = tiny.build_zoo(tmp_path / "z", corpus_glob=tiny_corpus, verbose=False, **SMALL)
    finally:
        os.umask(old)
    paths = [p for p in zoo.root.rglob("*")]
    assert zoo.model_dir / "model.safetensors" in paths
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
