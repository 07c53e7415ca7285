"""Stage 06: prompting a model for NER / RE / EE, its evaluation, and the ipywidgets demo panel.

* :class:`Models` loads the base (00) and the tuned model (04's merged model,
  or the base with 03's LoRA adapter) on first use; :func:`generate_answers`
  runs a decoding preset (:data:`PRESETS`: greedy, or 03's beams with the copy
  constraint for NER) on prompts built by :func:`knowlm_nb.ie.build_prompt`.
* :func:`evaluate_models` scores models x presets x tasks x languages on a
  subset of the held-out set with :func:`knowlm_nb.ie.evaluate`;
  :func:`f1_rows` and :func:`per_type_chart` show the result.
* The panel: pure functions (:func:`parse_schema_text`, :func:`prepare`,
  :func:`read_answer`, :func:`highlight_html`, :func:`table_html`,
  :func:`run_request`) and :class:`Panel`, the ipywidgets wiring around them.
* A standalone page for a classroom projector::

      python -m knowlm_nb.widgets serve [--profile tiny] [--port 8866]
      python -m knowlm_nb.widgets evaluate [--n 8] [--out f1.json]   # the F1 table alone

  writes a one-cell demo notebook into ``runs/<profile>/06/`` and serves it
  with Voilà (code hidden, widgets live).
"""
from __future__ import annotations

import argparse
import html
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Callable

from . import ROOT, ie
from .decoding import generate, ner_copy_constraint
from .instruct import load_adapter, load_base, load_template

MODEL_NAMES = ("base", "base + LoRA")
BOTH = "both, side by side"
PRESETS = {
    "greedy": {"num_beams": 1, "copy": False},
    "greedy + copy constraint": {"num_beams": 1, "copy": True},
    "03 decoding (5 beams + copy constraint)": {"num_beams": 5, "copy": True},
}
# short names of the presets, for tables and recorded figures
PRESET_KEYS = {"greedy": "greedy", "greedy + copy constraint": "greedy_copy",
               "03 decoding (5 beams + copy constraint)": "decoded"}
MAX_INPUT_CHARS = 600
COLOURS = ["#ffd54f", "#81d4fa", "#a5d6a7", "#f48fb1", "#ce93d8", "#ffab91", "#b0bec5",
           "#e6ee9c", "#80cbc4", "#bcaaa4", "#9fa8da", "#fff59d"]


# ------------------------------------------------------------------ models

class Models:
    """The demo's models, loaded on first use: ``base`` and ``base + LoRA``.

    ``base + LoRA`` is ``merged`` (04's merged model) when that folder holds a
    model, else ``base`` with the adapter at ``adapter``.
    """

    def __init__(self, base: str | Path, adapter: str | Path | None = None,
                 merged: str | Path | None = None, template: str = "alpaca_short"):
        self.base, self.template = Path(base), load_template(template)
        self.adapter = Path(adapter) if adapter else None
        self.merged = Path(merged) if merged else None
        self._loaded: dict[str, tuple] = {}

    def tuned(self) -> tuple[str, Path] | None:
        """Where ``base + LoRA`` comes from: ``("merged", folder)`` when that folder
        holds a model, else ``("adapter", folder)`` when it holds an adapter, else None."""
        if self.merged and (self.merged / "config.json").is_file():
            return "merged", self.merged
        if self.adapter and (self.adapter / "adapter_config.json").is_file():
            return "adapter", self.adapter
        return None

    def tuned_source(self) -> str:
        found = self.tuned()
        if found is None:
            return "missing"
        kind, folder = found
        return (f"04 merged model ({folder})" if kind == "merged"
                else f"00 base + 03 LoRA adapter ({folder})")

    def available(self) -> list[str]:
        return list(MODEL_NAMES) if self.tuned_source() != "missing" else ["base"]

    def get(self, name: str) -> tuple:
        """``(tokenizer, model)`` for ``name``."""
        if name not in self._loaded:
            if name == "base":
                self._loaded[name] = load_base(self.base)
            elif name == "base + LoRA":
                found = self.tuned()
                if found is None:
                    raise ValueError(f"no tuned model: neither a merged model (config.json) in "
                                     f"{self.merged} nor a LoRA adapter (adapter_config.json) "
                                     f"in {self.adapter}")
                kind, folder = found
                self._loaded[name] = (load_base(folder) if kind == "merged"
                                      else load_adapter(self.base, folder))
            else:
                raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
            self._loaded[name][1].eval()
        return self._loaded[name]

    def answer(self, name: str, examples: list[dict], preset: str, max_new_tokens: int = 64,
               batch_size: int = 16) -> list[str]:
        tok, model = self.get(name)
        return generate_answers(model, tok, self.template, examples, preset, max_new_tokens,
                                batch_size)


def generate_answers(model, tokenizer, template, examples: list[dict], preset: str,
                     max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """The model's answers to prompt examples (``instruction`` + ``input``) with a preset.

    The copy constraint of 03 applies to NER in the tuple style with the
    course's types (its grammar is that answer format); other prompts get the
    preset's beams alone.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown decoding preset {preset!r}; expected one of {list(PRESETS)}")
    if not examples:
        return []
    p = PRESETS[preset]
    prompts = [template.prompt(ex["instruction"], ex["input"]) for ex in examples]
    copy = p["copy"] and all(ex["task"] == "NER" and ex.get("style", "tuple") == "tuple"
                             and ex.get("input") for ex in examples)
    constraint = ner_copy_constraint(tokenizer, examples) if copy else None
    return generate(model, tokenizer, prompts, max_new_tokens, batch_size, constraint, p["num_beams"])


# -------------------------------------------------------------- evaluation

def evaluate_models(models: Models, n: int, presets: list[str] | None = None,
                    tasks=ie.TASKS, langs=ie.LANGS, names: list[str] | None = None,
                    style: str = "tuple", max_new_tokens: int = 64) -> dict:
    """F1 of each model x preset x task x language on ``n`` held-out examples each.

    Returns ``{(model, preset, task, lang): ie.evaluate(...) + "outputs"}``.
    """
    presets = list(PRESETS) if presets is None else presets
    names = models.available() if names is None else names
    out = {}
    for task in tasks:
        for lang in langs:
            examples = [ie.restyle(ex, style) for ex in ie.eval_subset(task, lang, n)]
            for name in names:
                for preset in presets:
                    outputs = models.answer(name, examples, preset, max_new_tokens)
                    result = ie.evaluate(task, examples, outputs, style)
                    result["outputs"] = outputs
                    out[name, preset, task, lang] = result
    return out


def f1_rows(results: dict) -> list[dict]:
    """One row per (model, preset, task, language): n, P/R/F1 (EE: trigger and argument F1)."""
    rows = []
    for (name, preset, task, lang), res in results.items():
        s = res["scores"]
        row = {"model": name, "decoding": PRESET_KEYS[preset], "task": task, "lang": lang,
               "n": len(res["records"])}
        if task == "EE":
            row.update(precision=s["argument"]["precision"], recall=s["argument"]["recall"],
                       f1=s["argument"]["f1"], trigger_f1=s["trigger"]["f1"])
        else:
            row.update(precision=s["precision"], recall=s["recall"], f1=s["f1"], trigger_f1="")
        row["clean"] = res["clean"]
        rows.append(row)
    return rows


def per_type_f1(results: dict, name: str, preset: str, task: str) -> dict[str, float]:
    """Per-type F1 of one model and preset on ``task``, both languages pooled (EE: triggers)."""
    golds, preds = [], []
    for (m, p, t, _), res in results.items():
        if (m, p, t) == (name, preset, task):
            preds += res["records"]
            golds += res["golds"]
    s = ie.score(task, golds, preds)
    per = (s["trigger"] if task == "EE" else s)["per_type"]
    return {k: v["f1"] for k, v in per.items() if v["gold"]}


def use_cjk_font() -> str | None:
    """Put a CJK-capable font first in matplotlib's sans-serif list; its name, or None.

    Without one (Debian: ``apt-get install fonts-noto-cjk``) Chinese labels draw
    as boxes. A font installed after matplotlib built its font cache is added
    from the system's font files.
    """
    import matplotlib
    from matplotlib import font_manager

    def find():
        names = [f.name for f in font_manager.fontManager.ttflist]
        return next((n for n in names if "Sans CJK" in n), None) or next(
            (n for n in names if "CJK" in n or n in ("WenQuanYi Zen Hei", "SimHei")), None)

    name = find()
    if name is None:
        for path in font_manager.findSystemFonts():
            if "CJK" in Path(path).name and "Sans" in Path(path).name:
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        name = find()
    if name is not None:
        fam = list(matplotlib.rcParams["font.sans-serif"])
        matplotlib.rcParams["font.sans-serif"] = [name] + [f for f in fam if f != name]
        matplotlib.rcParams["font.family"] = "sans-serif"
    return name


def per_type_chart(results: dict, preset: str, tasks=ie.TASKS):
    """Bars of per-type F1, base against tuned, one panel per task; labels in en and zh."""
    import matplotlib.pyplot as plt

    from . import report

    use_cjk_font()
    names = sorted({k[0] for k in results}, key=MODEL_NAMES.index)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        table = {n: per_type_f1(results, n, preset, task) for n in names}
        types = sorted(set().union(*table.values())) or ["(no gold)"]
        shown = {n: {f"{t}\n{ie.label(t, 'zh')}": row.get(t, 0.0) for t in types}
                 for n, row in table.items()}
        report.grouped_bars(shown, "F1", f"{task}{' triggers' if task == 'EE' else ''}: per type",
                            ax=ax)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------- the panel's pure logic

def schema_text(task: str, schema=None) -> str:
    """A schema as the editor shows it: types comma-separated; EE one ``Type: roles`` per line."""
    schema = ie.check_schema(task, schema)
    if task == "EE":
        return "\n".join(f"{t}: {', '.join(roles)}" for t, roles in schema.items())
    return ", ".join(schema)


def parse_schema_text(task: str, text: str):
    """The editor's text as a schema; a ValueError says what is wrong (empty text: the default)."""
    text = (text or "").strip()
    if not text:
        return ie.default_schema(task)
    if task == "EE":
        schema = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            name, _, roles = line.replace("：", ":").partition(":")
            if not name.strip():
                raise ValueError(f"schema line {line!r}: write 'EventType: role, role'")
            schema[name.strip()] = [r.strip() for r in roles.replace("，", ",").split(",")
                                    if r.strip()]
        return ie.check_schema(task, schema)
    names = [x.strip() for x in text.replace("，", ",").replace("、", ",").replace("\n", ",").split(",")]
    return ie.check_schema(task, [x for x in names if x])


def prepare(text: str, task: str, lang: str, schema_src: str, style: str,
            max_chars: int = MAX_INPUT_CHARS) -> tuple[dict | None, list[str]]:
    """``(prompt example or None, messages)``: empty input and a bad schema give a message,
    an over-long input is cut to ``max_chars`` with a notice."""
    messages: list[str] = []
    text = (text or "").strip()
    if not text:
        return None, ["Type or paste a sentence first (or pick an evaluation example)."]
    if len(text) > max_chars:
        messages.append(f"The input had {len(text)} characters; only the first {max_chars} "
                        "were used.")
        text = text[:max_chars]
    try:
        schema = parse_schema_text(task, schema_src)
        example = ie.build_prompt(task, lang, schema, text, style)
    except ValueError as exc:
        return None, messages + [f"Schema problem: {exc}"]
    example["schema"] = schema
    example["text"] = text
    return example, messages


def read_answer(example: dict, raw: str, gold: list[tuple] | None = None) -> dict:
    """Parse one raw answer for the panel: records, problems, table and spans, F1 vs gold."""
    records, problems = ie.parse(example["task"], raw, example["style"], example["schema"])
    out = {"raw": raw, "records": records, "problems": problems,
           "table": table_html(example["task"], records),
           "spans": highlight_html(example["text"], example["task"], records), "f1": None}
    if gold is not None:
        out["f1"] = ie.headline(example["task"], ie.score(example["task"], [gold], [records]))
    return out


def _marks(task: str, records: list[tuple]) -> list[tuple[str, str]]:
    """(span, label) pairs to highlight: entities; heads and tails; triggers and arguments."""
    if task == "NER":
        return [(s, t) for t, s in records]
    if task == "RE":
        return [m for h, r, t in records for m in ((h, f"{r} head"), (t, f"{r} tail"))]
    return [m for t, trig, args in records for m in [(trig, t)] + [(a, r) for r, a in args]]


def highlight_html(text: str, task: str, records: list[tuple]) -> str:
    """``text`` as HTML with each found span marked and labelled, one colour per type.

    Spans are matched longest first and never overlap; a span not in the text is skipped.
    """
    taken = [None] * len(text)
    labels = sorted({lab for _, lab in _marks(task, records)})
    colour = {lab: COLOURS[i % len(COLOURS)] for i, lab in enumerate(labels)}
    for span, lab in sorted(_marks(task, records), key=lambda m: -len(m[0])):
        if not span:
            continue
        at = text.find(span)
        while at != -1:
            if all(x is None for x in taken[at:at + len(span)]):
                for i in range(at, at + len(span)):
                    taken[i] = (at, lab)
                break
            at = text.find(span, at + 1)
    parts, i = [], 0
    while i < len(text):
        if taken[i] is None:
            j = i
            while j < len(text) and taken[j] is None:
                j += 1
            parts.append(html.escape(text[i:j]))
        else:
            j = i
            while j < len(text) and taken[j] == taken[i]:
                j += 1
            lab = taken[i][1]
            parts.append(f'<mark class="ie-span" data-type="{html.escape(lab)}" style="background:'
                         f'{colour[lab]};padding:0 2px;border-radius:3px">{html.escape(text[i:j])}'
                         f'<sub style="font-size:70%;color:#333"> {html.escape(lab)}</sub></mark>')
        i = j
    return '<div class="ie-text" style="font-size:18px;line-height:2">' + "".join(parts) + "</div>"


def _columns(task: str) -> list[str]:
    return {"NER": ["type", "entity"], "RE": ["head", "relation", "tail"],
            "EE": ["event type", "trigger", "arguments"]}[task]


def table_html(task: str, records: list[tuple]) -> str:
    """The parsed records as an HTML table (class ``ie-table``, one ``ie-row`` per record)."""
    head = "".join(f"<th>{c}</th>" for c in _columns(task))
    rows = []
    for rec in records:
        cells = list(rec[:2]) + ["; ".join(f"{r}: {a}" for r, a in rec[2])] if task == "EE" else rec
        rows.append('<tr class="ie-row">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                    + "</tr>")
    if not rows:
        rows.append(f'<tr class="ie-empty"><td colspan="{len(_columns(task))}">(nothing found)</td></tr>')
    return (f'<table class="ie-table" style="border-collapse:collapse"><tr>{head}</tr>'
            + "".join(rows) + "</table>")


def run_request(example: dict, model_names: list[str], preset: str,
                answer: Callable[[str, dict, str], str], gold: list[tuple] | None = None) -> dict:
    """Ask each model in ``model_names`` and read its answer; a failing call is an ``error``."""
    out = {}
    for name in model_names:
        try:
            raw = answer(name, example, preset)
        except Exception as exc:  # shown in the panel, not as a traceback
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[name] = read_answer(example, raw, gold)
    return out


def result_html(name: str, res: dict) -> str:
    """One model's result as the panel shows it."""
    if "error" in res:
        return (f'<div class="ie-error" style="color:#b71c1c"><b>{html.escape(name)}</b>: the model '
                f'call failed: {html.escape(res["error"])}</div>')
    parts = [f"<h4>{html.escape(name)}</h4>",
             f'<pre class="ie-raw" style="white-space:pre-wrap">{html.escape(res["raw"]) or "(empty)"}</pre>',
             res["table"], res["spans"]]
    if res["problems"]:
        parts.append("<div><i>parser notes:</i> " + html.escape("; ".join(res["problems"])) + "</div>")
    if res["f1"] is not None:
        parts.append('<div class="ie-f1">vs gold: ' + ", ".join(
            f"{k} {v:.2f}" for k, v in res["f1"].items()) + "</div>")
    return "\n".join(parts)


# ------------------------------------------------------------ the panel

class Panel:
    """The demo: an ipywidgets box (``.box``) wired to :func:`run_request`.

    ``answer(model_name, example, preset) -> raw text`` is the model call
    (default: :meth:`Models.answer` on one example); tests pass a fake.
    """

    def __init__(self, models: Models | None = None, answer: Callable | None = None,
                 max_chars: int = MAX_INPUT_CHARS, max_new_tokens: int = 64,
                 examples: list[dict] | None = None):
        import ipywidgets as W

        self.models, self.max_chars = models, max_chars
        if answer is None:
            if models is None:
                raise ValueError("give models or an answer function")

            def answer(name, example, preset):
                return models.answer(name, [example], preset, max_new_tokens)[0]
        self.answer = answer
        self.examples = examples if examples is not None else [
            ex for t in ie.TASKS for lang in ie.LANGS for ex in ie.eval_subset(t, lang, 5)]
        choices = models.available() if models is not None else list(MODEL_NAMES)
        self.text = W.Textarea(placeholder="A sentence to extract from ...",
                               layout=W.Layout(width="100%", height="80px"))
        self.task = W.Dropdown(options=list(ie.TASKS), value="NER", description="task")
        self.lang = W.Dropdown(options=list(ie.LANGS), value="en", description="language")
        self.style = W.Dropdown(options=list(ie.STYLES), value="tuple", description="style")
        self.preset = W.Dropdown(options=list(PRESETS), value="greedy", description="decoding")
        self.model = W.Dropdown(options=choices + ([BOTH] if len(choices) > 1 else []),
                                value=choices[-1], description="model")
        self.schema = W.Textarea(value=schema_text("NER"), description="schema",
                                 layout=W.Layout(width="100%", height="60px"))
        self.example = W.Dropdown(options=[("(your own text)", -1)] + [
            (f"{ex['id']}: {ex['input'][:40]}", i) for i, ex in enumerate(self.examples)],
            value=-1, description="example")
        self.run = W.Button(description="Run", button_style="primary")
        self.status = W.HTML()
        self.prompt_out = W.HTML()
        self.left, self.right = W.HTML(), W.HTML()
        self.results = W.HBox([self.left, self.right])
        self.last: dict = {}
        self.task.observe(self._on_task, names="value")
        self.example.observe(self._on_example, names="value")
        self.run.on_click(self._on_run)
        self.box = W.VBox([
            W.HTML("<h3>Knowledge extraction with a tiny ZhiXi</h3>"), self.example, self.text,
            W.HBox([self.task, self.lang, self.style]), W.HBox([self.preset, self.model]),
            self.schema, self.run, self.status, self.prompt_out, self.results])

    def _on_task(self, change) -> None:
        self.schema.value = schema_text(change["new"])

    def _on_example(self, change) -> None:
        if change["new"] < 0:
            return
        ex = self.examples[change["new"]]
        self.task.value, self.lang.value = ex["task"], ex["lang"]
        self.text.value = ex["input"]

    def gold(self) -> list[tuple] | None:
        """The picked evaluation example's gold records, while its text is unchanged."""
        i = self.example.value
        if i < 0:
            return None
        ex = self.examples[i]
        same = ex["input"] == self.text.value.strip() and ex["task"] == self.task.value
        return ie.gold_records(ex["task"], ex["gold"]) if same else None

    def _on_run(self, _button=None) -> None:
        example, messages = prepare(self.text.value, self.task.value, self.lang.value,
                                    self.schema.value, self.style.value, self.max_chars)
        self.status.value = "".join(f'<div class="ie-notice">{html.escape(m)}</div>' for m in messages)
        self.left.value = self.right.value = ""
        if example is None:
            self.prompt_out.value = ""
            return
        prompt = (self.models.template.prompt(example["instruction"], example["input"])
                  if self.models is not None else f"{example['instruction']}\n\n{example['input']}")
        self.prompt_out.value = ('<details open><summary>prompt</summary><pre class="ie-prompt" '
                                 f'style="white-space:pre-wrap">{html.escape(prompt)}</pre></details>')
        names = list(MODEL_NAMES) if self.model.value == BOTH else [self.model.value]
        self.status.value += '<div class="ie-busy">running ...</div>'
        self.last = run_request(example, names, self.preset.value, self.answer, self.gold())
        self.status.value = self.status.value.replace('<div class="ie-busy">running ...</div>', "")
        views = [result_html(n, self.last[n]) for n in names]
        self.left.value = views[0]
        self.right.value = views[1] if len(views) > 1 else ""


def demo(profile: str = "tiny", workdir: str = "", base: str = "", adapter: str = "",
         merged: str = "") -> Panel:
    """The panel on the profile's artifacts (00 base, 03 adapter, 04 merged model)."""
    from . import config

    p = config.notebook_params(profile, "06")
    cfg = config.Config("06", p, config.workdir_for(profile, workdir or p["workdir"]))
    models = Models(base or cfg.path("base_model"), adapter or cfg.path("adapter_path"),
                    merged or cfg.path("model_path"), p["prompt_template"])
    return Panel(models, max_chars=p["max_input_chars"], max_new_tokens=p["max_new_tokens"])


# ------------------------------------------------------------- standalone

def write_demo_notebook(path: Path, **demo_args: str) -> Path:
    """A one-cell notebook that shows ``demo(**demo_args)``, for Voilà."""
    import nbformat

    from .files import write_text

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        "from knowlm_nb import widgets\n"
        f"panel = widgets.demo(**{ {k: str(v) for k, v in demo_args.items()}!r})\npanel.box")]
    return write_text(Path(path), nbformat.writes(nb))


def serve_command(notebook: Path, port: int, token: str) -> list[str]:
    """The Voilà argv (a list, never a shell string) that serves ``notebook`` on 127.0.0.1."""
    return [sys.executable, "-m", "voila", str(notebook), f"--port={port}", "--no-browser",
            "--Voila.ip=127.0.0.1", f"--token={token}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.widgets",
                                 description="The IE demo panel as a standalone Voila page.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--profile", default="tiny")
    s.add_argument("--workdir", default="")
    s.add_argument("--port", type=int, default=8866)
    s.add_argument("--token", default="", help="default: a random one, printed")
    e = sub.add_parser("evaluate", help="F1 table of base and tuned, greedy and decoded")
    e.add_argument("--profile", default="tiny")
    e.add_argument("--workdir", default="")
    e.add_argument("--n", type=int, default=0, help="examples per task and language (0: all)")
    e.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    from . import config, report

    wd = config.workdir_for(args.profile, args.workdir)
    if args.command == "evaluate":
        p = config.notebook_params(args.profile, "06")
        cfg = config.Config("06", p, wd)
        models = Models(cfg.path("base_model"), cfg.path("adapter_path"), cfg.path("model_path"),
                        p["prompt_template"])
        try:
            rows = f1_rows(evaluate_models(models, args.n or 10_000, ["greedy", list(PRESETS)[-1]],
                                           max_new_tokens=p["max_new_tokens"]))
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(report.markdown_table(rows))
        if args.out:
            from .files import write_json

            write_json(Path(args.out), rows)
        return 0
    nb = write_demo_notebook(wd / "06" / "demo.ipynb", profile=args.profile, workdir=args.workdir)
    token = args.token or secrets.token_urlsafe(16)
    print(f"open http://127.0.0.1:{args.port}/?token={token}", flush=True)
    return subprocess.call(serve_command(nb, args.port, token), cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
