"""Stage 03: templates, prompt masking, the no-target guard, the mix, adapters."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from knowlm_nb import ROOT, decoding, ie, instruct, tiny
from knowlm_nb.names import NameMaker, NamesError, name_maker


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
    held_out_words = name_maker("words", 0).banned
    for r in words_train:
        if r["category"].startswith("ie_"):
            assert not any(name in r["input"] for name in banned)
            assert not {w.lower() for w in re.findall(r"[A-Za-z]+", r["input"])} & held_out_words
    with pytest.raises(NamesError, match="name style"):
        instruct.build_mix(100, names="emoji")


def test_substitute_names_renames_consistently():
    rec = {"id": "t", "lang": "en",
           "text": "Harrowgate Institute hired Ann Lee; Ann Lee moved to Harrowgate.",
           "entities": [{"type": "organization", "text": "Harrowgate Institute"},
                        {"type": "person", "text": "Ann Lee"},
                        {"type": "location", "text": "Harrowgate"}],
           "relations": [{"head": "Ann Lee", "relation": "works_for", "tail": "Harrowgate Institute"}],
           "events": []}
    new = ie.substitute_names(rec, NameMaker(3))
    ie.check_record(new)
    names = [e["text"] for e in new["entities"]]
    assert not set(names) & {"Harrowgate Institute", "Ann Lee", "Harrowgate"}
    assert new["text"].count(names[1]) == 2
    assert new["relations"][0] == {"head": names[1], "relation": "works_for", "tail": names[0]}


def test_substitute_names_keeps_a_time_s_shape():
    rec = {"id": "t", "lang": "zh", "text": "韩立冬周六在宁川开业，2023年4月12日扩建。",
           "entities": [{"type": "person", "text": "韩立冬"}, {"type": "time", "text": "周六"},
                        {"type": "location", "text": "宁川"}, {"type": "time", "text": "2023年4月12日"}],
           "relations": [], "events": []}
    for seed in range(20):
        new = ie.substitute_names(rec, NameMaker(seed))
        times = [e["text"] for e in new["entities"] if e["type"] == "time"]
        assert re.fullmatch(r"周[一二三四五六日]", times[0]) and re.fullmatch(r"\d{4}年\d{1,2}月\d{1,2}日", times[1])
        assert all(t in new["text"] for t in times)


def test_tuning_data_has_times_in_many_shapes():
    # fresh tuning examples, after the first pass over the sentences: times in many shapes
    fresh = instruct.fresh_ie_examples("zh", 1600, seed=0)
    ner = [ex for ex in fresh[400:] if ex["task"] == "NER"]
    assert len(ner) > 0.5 * len(fresh[400:])  # NER weighted 3:1:1 over RE and EE
    late = [p for ex in ner for p in re.findall(r"\(时间, ([^)]*)\)", ex["output"])]
    assert len(late) > 300
    assert sum(bool(re.fullmatch(r"周[一二三四五六日]", t)) for t in late) > 0.05 * len(late)
    assert sum(bool(re.fullmatch(r"\d{4}年", t)) for t in late) > 0.1 * len(late)


def test_substitute_names_renames_names_inside_longer_spans():
    """An event argument such as "fans of Rookwood Athletic" holds a name; it is renamed
    there too, so every training sentence gets fresh names (6 of 644 used to keep theirs)."""
    for lang in ("en", "zh"):
        train = ie.split_records(lang)[0]
        inside = [r for r in train if any(n in a["text"] and n != a["text"] for ev in r["events"]
                                          for a in ev["arguments"] for n in ie.names_of(r))]
        assert len(inside) >= 3, lang
        maker = NameMaker(0)
        for rec in train:
            new = ie.substitute_names(rec, maker)
            ie.check_record(new)
            assert new["text"] != rec["text"], rec["text"]
            assert not any(n in new["text"] for n in ie.names_of(rec) if len(n) > 3), rec["text"]


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
        grammar = decoding.NerGrammar.for_example(ex)
        # an answer cut by the cap may end inside a character, which decodes as U+FFFD
        assert grammar.feed(grammar.START, out.rstrip("\ufffd").encode()) is not None, out
        pairs, _ = ie.parse_ner(out)
        assert all(name in ex["input"] for _, name in pairs), out
    assert scores["predicted"] > 0  # pairs, not only NONE
    with pytest.raises(decoding.DecodingError, match="num_beams"):
        decoding.generate(model, tok, ["x"], num_beams=0)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU branch: 8-bit needs CUDA")
def test_8bit_without_cuda_is_refused(tok_and_model):
    zoo, _, _ = tok_and_model
    with pytest.raises(instruct.InstructError, match="load_in_8bit needs a CUDA GPU"):
        instruct.load_base(zoo.model_dir, load_in_8bit=True)


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
