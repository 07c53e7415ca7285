"""The copy-pretraining recipe of the shipped base: its lines, probe, stages, model card and CLI."""
import hashlib
import itertools
import json

import pytest

from knowlm_nb import ROOT, copybase, files, ie, tiny
from knowlm_nb.tiny import ZooError

SMALL = dict(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             intermediate_size=128, max_position=128)


def test_copy_lines_repeat_their_names_and_follow_the_recipe_shares():
    lines = list(copybase.copy_lines(4000, seed=1))
    share = lambda pred: sum(map(pred, lines)) / len(lines)  # noqa: E731
    assert abs(share(lambda l: l.startswith("Repeat after me:")) - 0.10) < 0.02
    assert abs(share(lambda l: "Names mentioned:" in l) - 0.20) < 0.03
    assert abs(share(lambda l: "Where does" in l) - 0.15) < 0.03
    rep = next(l for l in lines if l.startswith("Repeat after me:"))
    x = rep[len("Repeat after me: "):].split(". ")[0]
    assert rep.count(x) == 2
    assert list(copybase.copy_lines(50, seed=1)) == lines[:50]
    # sentence_share takes that share of lines from the given sentences, and 0 changes nothing
    mixed = list(copybase.copy_lines(2000, seed=1, sentences=iter(["S."] * 2000), sentence_share=0.5))
    assert abs(mixed.count("S.") / len(mixed) - 0.5) < 0.04
    assert list(copybase.copy_lines(50, seed=1, sentences=iter([]), sentence_share=0.0)) == lines[:50]
    with pytest.raises(ZooError, match="sentences"):
        next(copybase.copy_lines(5, seed=1, sentence_share=0.5))


def test_induction_probe_separates_a_copying_model_from_an_untrained_one():
    tok, base = tiny.build_zoo(ROOT / "runs" / "tiny" / "00", verbose=False).load()
    untrained = tiny.build_model(base.config, seed=0)
    assert copybase.induction_probe(untrained, tok) > 5.0
    assert copybase.induction_probe(base, tok) < 3.0  # the shipped base copies (partly)


def test_shipped_base_files_and_model_card():
    shipped = {p.name for p in tiny.SHIPPED_BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json", "README.md"} <= shipped
    info = json.loads((tiny.SHIPPED_BASE / "recipe.json").read_text())
    assert files.weights_hash(tiny.SHIPPED_BASE) == info["weights_sha256"]
    probes = [h["probe"] for h in info["history"]]
    assert probes[0] > 5.0 and probes[-1] < 3.0
    card = (tiny.SHIPPED_BASE / "README.md").read_text()
    assert "python -m knowlm_nb.copybase --zoo runs/tiny/00-random --out data_samples/tiny_base" in card
    assert f"{info['parameters']:,}" in card
    assert card == copybase.model_card(info)  # the card says what the code and recipe.json say


def test_shipped_base_follows_the_recipe_in_the_code():
    info = json.loads((tiny.SHIPPED_BASE / "recipe.json").read_text())
    assert info["stages"] == copybase.COPY_STAGES
    assert info["history"][-1]["step"] == sum(s["steps"] for s in copybase.COPY_STAGES)


def test_copy_base_resumes_from_its_first_stages_only(tmp_path, tiny_corpus):
    zoo = tiny.build_zoo(tmp_path / "z", corpus_glob=tiny_corpus, verbose=False, **SMALL)
    stage = {"steps": 2, "batch_size": 2, "block": 32, "lr": 1e-3, "warmup": 0,
             "repeat_share": 0.5, "seed": 0, "probe_every": 1}
    first = copybase.ship_copy_base(tmp_path / "b1", zoo.root, [stage], progress=False)
    assert [h["step"] for h in first["history"]] == [0, 1, 2]
    both = [stage, dict(stage, seed=1)]
    info = copybase.ship_copy_base(tmp_path / "b2", zoo.root, both, progress=False, resume=tmp_path / "b1")
    assert [h["step"] for h in info["history"]] == [0, 1, 2, 3, 4]
    assert info["history"][:3] == first["history"]
    assert info["resumed"] == [{"from_stages": 1, "weights_sha256": first["weights_sha256"]}]
    assert info["weights_sha256"] != first["weights_sha256"]  # the second stage trained
    # a base whose stages are not the first part of the recipe cannot be resumed
    with pytest.raises(ZooError, match="cannot resume"):
        copybase.ship_copy_base(tmp_path / "b3", zoo.root, [dict(stage, lr=5e-3), stage],
                            progress=False, resume=tmp_path / "b1")
    assert not (tmp_path / "b3").exists()
    with pytest.raises(ZooError, match="no recipe.json"):
        copybase.ship_copy_base(tmp_path / "b3", zoo.root, both, progress=False, resume=tmp_path)


def test_mention_lines_list_names_of_training_sentences_never_held_out_ones():
    lines = list(itertools.islice(copybase.mention_lines(seed=5), 1500))  # over 2 passes
    banned = set().union(*(ie.names_of(r) for lang in ("en", "zh") for r in ie.split_records(lang)[1]))
    train_texts = {r["text"] for lang in ("en", "zh") for r in ie.split_records(lang)[0]}
    zh = 0
    for line in lines:
        lang = "zh" if "文中提到的名字：" in line else "en"
        zh += lang == "zh"
        cue, sep, end = copybase.MENTION_CUES[lang]
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
    assert list(itertools.islice(copybase.mention_lines(seed=5), 1500)) == lines


def test_mention_lines_are_still_the_lines_of_the_base_recipe():
    """The fifth stage of COPY_STAGES (seed 4) trains on these lines. Their digest is pinned
    so that a change to the fresh-name code, the IE sentences or the corpus words shows up
    here: the shipped base's recipe would no longer rebuild it (rebuild and ship it anew, or
    keep the old lines). Pinned 2026-12-01, equal to what commit 92a230b made."""
    lines = list(itertools.islice(copybase.mention_lines(4), 2000))
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == \
        "46ed36de31033498fc22b69895c0151f03c0673a951ed84b7128bae05c395a00"


def test_cli_checks_its_steps_before_building_anything(tmp_path, capsys):
    assert copybase.main(["--zoo", str(tmp_path / "z"), "--out", str(tmp_path / "b"), "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not (tmp_path / "b").exists()
