"""knowlm_nb.widgets: the panel's pure functions and its wiring, driven headless."""
import json
from pathlib import Path

import pytest

from knowlm_nb import ie, widgets

SENTENCE = "Marta Velling was born in Port Elsin."


def fake_answer(name, example, preset):
    """A stand-in model: the base fails, the tuned one answers in the asked style."""
    if name == "base":
        raise RuntimeError("CUDA out of memory (pretend)")
    recs = [("person", "Marta Velling"), ("location", "Port Elsin")]
    return ie.format_answer("NER", example["lang"], recs, example["style"])


@pytest.fixture
def panel():
    return widgets.Panel(answer=fake_answer, max_chars=100,
                         examples=ie.eval_subset("NER", "en", 2) + ie.eval_subset("NER", "zh", 2))


def test_schema_editor_text_round_trips_and_reports_mistakes():
    for task in ie.TASKS:
        assert widgets.parse_schema_text(task, widgets.schema_text(task)) == ie.default_schema(task)
        assert widgets.parse_schema_text(task, "  ") == ie.default_schema(task)
    assert widgets.parse_schema_text("NER", "人物，disease、drug") == ["person", "disease", "drug"]
    assert widgets.parse_schema_text("EE", "Sale: seller, item\n出生") == {
        "Sale": ["seller", "item"], "Birth": ie.EVENT_ROLES["Birth"]}
    with pytest.raises(ValueError, match="EventType"):
        widgets.parse_schema_text("EE", ": buyer")


def test_prepare_gives_friendly_messages():
    ex, msgs = widgets.prepare("   ", "NER", "en", "", "tuple")
    assert ex is None and "Type or paste" in msgs[0]
    ex, msgs = widgets.prepare("x" * 50, "NER", "en", "", "tuple", max_chars=20)
    assert ex["input"] == "x" * 20 and "50 characters" in msgs[0] and "first 20" in msgs[0]
    ex, msgs = widgets.prepare(SENTENCE, "EE", "en", "Sale: seller: x", "tuple")
    assert ex is not None  # "seller: x" is a role name with a colon: kept, not an error
    ex, msgs = widgets.prepare(SENTENCE, "NER", "en", ",,,", "tuple")
    assert ex is None and msgs[0].startswith("Schema problem:")
    ex, msgs = widgets.prepare(SENTENCE, "RE", "zh", "works_for", "json")
    assert ex["style"] == "json" and json.loads(ex["instruction"])["schema"] == ["任职于"]


def test_highlight_marks_each_span_once_escaped_and_typed():
    text = "<b>Ann</b> met Ann Lee in Rome."
    out = widgets.highlight_html(text, "NER", [("person", "Ann Lee"), ("person", "Ann"),
                                                ("location", "Rome"), ("time", "absent")])
    assert "&lt;b&gt;" in out and "<b>" not in out              # input is escaped
    assert out.count('data-type="person"') == 2 and out.count('data-type="location"') == 1
    assert "absent" not in out                                  # a span not in the text is skipped
    assert ">Ann Lee<sub" in out                                # the longer span wins
    re_out = widgets.highlight_html("Ann works for Acme.", "RE", [("Ann", "works_for", "Acme")])
    assert 'data-type="works_for head"' in re_out and 'data-type="works_for tail"' in re_out
    ee = widgets.highlight_html("远航收购翼展。", "EE", [("Acquisition", "收购", (("buyer", "远航"),))])
    assert 'data-type="Acquisition"' in ee and 'data-type="buyer"' in ee


def test_table_html_rows_and_empty_table():
    t = widgets.table_html("EE", [("Sale", "sold", (("seller", "A<"), ("item", "B")))])
    assert t.count('class="ie-row"') == 1 and "seller: A&lt;; item: B" in t
    assert "(nothing found)" in widgets.table_html("NER", [])


def test_run_button_fills_every_output(panel):
    panel.text.value = SENTENCE
    panel.model.value = "base + LoRA"
    panel.run.click()
    assert "Extract every entity" in panel.prompt_out.value
    assert panel.left.value.count('class="ie-row"') == 2
    assert 'data-type="person"' in panel.left.value and panel.right.value == ""
    assert panel.last["base + LoRA"]["records"] == [("person", "Marta Velling"), ("location", "Port Elsin")]
    assert panel.last["base + LoRA"]["f1"] is None              # no evaluation example picked


def test_both_models_side_by_side_and_a_failing_call_shows_its_error(panel):
    panel.text.value = SENTENCE
    panel.model.value = widgets.BOTH
    panel.run.click()
    assert "ie-error" in panel.left.value and "CUDA out of memory" in panel.left.value
    assert "Traceback" not in panel.left.value
    assert panel.right.value.count('class="ie-row"') == 2


def test_empty_and_overlong_input(panel):
    panel.text.value = ""
    panel.run.click()
    assert "Type or paste" in panel.status.value and panel.left.value == ""
    panel.text.value = SENTENCE + " " + "x" * 200
    panel.model.value = "base + LoRA"
    panel.run.click()
    assert "only the first 100" in panel.status.value and panel.left.value.count("ie-row") == 2


def test_picking_an_example_fills_the_panel_and_scores_against_gold(panel):
    panel.example.value = 2                                     # the first Chinese example
    ex = panel.examples[2]
    assert (panel.text.value, panel.task.value, panel.lang.value) == (ex["input"], "NER", "zh")
    panel.model.value = "base + LoRA"
    panel.run.click()
    f1 = panel.last["base + LoRA"]["f1"]
    assert f1 == {"precision": 0.0, "recall": 0.0, "f1": 0.0}   # fake answer: other names
    assert "vs gold" in panel.left.value
    panel.text.value = "something else"                         # edited text: no gold any more
    panel.run.click()
    assert panel.last["base + LoRA"]["f1"] is None


def test_task_and_style_switches(panel):
    panel.task.value = "EE"
    assert panel.schema.value.startswith("Acquisition: buyer")
    panel.task.value = "NER"
    panel.style.value = "json"
    panel.text.value = SENTENCE
    panel.model.value = "base + LoRA"
    panel.run.click()
    assert "&quot;schema&quot;" in panel.prompt_out.value and panel.left.value.count("ie-row") == 2
    panel.schema.value = "animal"
    panel.run.click()                                           # the answer's types are not asked for
    assert panel.left.value.count("ie-row") == 0 and "unknown" in panel.left.value


def test_per_type_f1_and_rows_from_results():
    exs = ie.eval_subset("NER", "en", 3)
    res = ie.evaluate("NER", exs, [ex["output"] for ex in exs])
    res["outputs"] = [ex["output"] for ex in exs]
    results = {("base + LoRA", "greedy", "NER", "en"): res}
    rows = widgets.f1_rows(results)
    assert rows[0]["f1"] == 1.0 and rows[0]["decoding"] == "greedy" and rows[0]["n"] == 3
    per = widgets.per_type_f1(results, "base + LoRA", "greedy", "NER")
    assert per and set(per.values()) == {1.0}


def test_generate_answers_rejects_an_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        widgets.generate_answers(None, None, None, [{"task": "NER"}], "hot")
    assert widgets.generate_answers(None, None, None, [], "greedy") == []


def test_serve_command_is_an_argv_on_localhost_with_a_token(tmp_path):
    nb = widgets.write_demo_notebook(tmp_path / "demo.ipynb", base="x; rm -rf /")
    argv = widgets.serve_command(nb, 8123, "tok")
    assert isinstance(argv, list) and "--Voila.ip=127.0.0.1" in argv and "--token=tok" in argv
    src = json.loads(Path(nb).read_text())["cells"][0]["source"]
    assert "'x; rm -rf /'" in "".join(src)                      # a string literal, never code


def test_models_reports_what_it_has(tmp_path):
    m = widgets.Models(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert m.tuned_source() == "missing" and m.available() == ["base"] and m.tuned() is None
    (tmp_path / "adapter").mkdir()                       # a folder without an adapter is not one
    with pytest.raises(ValueError, match="no tuned model.*adapter_config.json"):
        m.get("base + LoRA")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert m.available() == list(widgets.MODEL_NAMES) and "LoRA adapter" in m.tuned_source()
    assert m.tuned() == ("adapter", tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert m.tuned() == ("merged", tmp_path / "merged") and "merged" in m.tuned_source()
    with pytest.raises(ValueError, match="unknown model"):
        m.get("gpt")
