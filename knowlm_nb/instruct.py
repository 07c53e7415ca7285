"""Stage 03: LoRA instruction tuning for information extraction.

KnowLM's second stage tuned its pretrained model with LoRA on ~1.4M
instructions in five categories. This module has the pieces, each small
enough to read:

* :class:`Template` - Alpaca prompt templates shipped *inside the package*
  (``knowlm_nb/templates/*.json``) and loaded with ``importlib.resources``,
  so they load from any working directory (the original read them relative
  to the current folder).
* :func:`tokenize_example` - prompt masking: labels are -100 on the prompt
  (unless ``train_on_inputs``), EOS is appended and kept in the labels, and
  truncation at ``cutoff_len`` is reported.
* :func:`build_mix` - the five categories in KnowLM's proportions, scaled
  down; IE examples are fresh-name copies of the training sentences
  (:func:`knowlm_nb.ie.substitute_names`), so the model must copy names;
  :func:`name_maker` invents them from ordinary words (:class:`WordNames`)
  or from random syllables.
* :class:`MaskedCollator` - pads, and refuses a batch with no trainable
  target token (the original's "loss stuck at 0").
* :func:`train_lora` - PEFT LoRA with the HF Trainer (8-bit base on GPU);
  :func:`train_or_reuse` loads instead an adapter already saved from the same
  base, examples and settings (notebook 03's classroom mode, ``reuse_adapter``).
* :func:`generate` / :func:`evaluate_ner` - batched greedy decoding with left
  padding, an attention mask, a token cap and a cut at the first EOS, scored
  with :func:`knowlm_nb.ie.score_ner`; :func:`repeat_rate` checks whether the
  base can copy the held-out names at all.
* :func:`ner_copy_constraint` - decoding that may only write type labels
  and spans of the input that cut no word (with ``num_beams``, beam search),
  reported beside greedy; :func:`copy_errors` counts the names that break
  those rules.
* :func:`copy_instructions` - optional copy-style general instructions
  ("list the names in order"), ``copy_share`` of the general category.

CLI (the notebook's script twin)::

    python -m knowlm_nb.instruct tune --base DIR --out DIR [--profile tiny] [--max-steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from . import ROOT, ie
from .tiny import _ZH_GIVEN, _ZH_SURNAMES, NameMaker, iter_jsonl, mention_recall

IGNORE = -100

# KnowLM's stage-2 instruction counts (its README): category -> examples.
KNOWLM_COUNTS = {"cot": 202_333, "general": 105_216, "code": 44_688,
                 "ie_en": 537_429, "ie_zh": 486_768}
CATEGORIES = tuple(KNOWLM_COUNTS)


class InstructError(ValueError):
    """Bad input to instruction tuning; the message says what is wrong."""


class NoTargetError(InstructError):
    """A batch in which every label is -100: nothing to learn from."""


# ------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str

    def prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response(self, generated: str) -> str:
        """The answer part of a full prompt + completion string."""
        return generated.split(self.response_split, 1)[-1].strip()


def template_names() -> list[str]:
    files = resources.files("knowlm_nb") / "templates"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def load_template(name: str = "alpaca") -> Template:
    """A template shipped in ``knowlm_nb/templates``, whatever the working directory."""
    if name not in template_names():
        raise InstructError(f"unknown prompt template {name!r}; shipped: {template_names()}")
    data = json.loads((resources.files("knowlm_nb") / "templates" / f"{name}.json")
                      .read_text(encoding="utf-8"))
    return Template(name, data["prompt_input"], data["prompt_no_input"], data["response_split"])


# ------------------------------------------------------------- tokenizing

def tokenize_example(tokenizer, example: dict, template: Template, cutoff_len: int,
                     train_on_inputs: bool = False) -> dict:
    """``input_ids`` / ``labels`` for one instruction example.

    The prompt and the response are tokenized separately and joined, so the
    boundary is exact: labels are -100 on every prompt token (BOS included)
    unless ``train_on_inputs``. EOS ends the response and is a label: that is
    how the model learns to stop. Longer than ``cutoff_len``: truncated, and
    ``truncated`` is True (the EOS is then lost, as in the original).
    """
    if cutoff_len < 2:
        raise InstructError(f"cutoff_len must be at least 2, got {cutoff_len}")
    for key in ("instruction", "output"):
        if not isinstance(example.get(key), str):
            raise InstructError(f"example {example.get('id', '?')}: {key!r} must be a string")
    prompt = tokenizer(template.prompt(example["instruction"], example.get("input") or ""))["input_ids"]
    answer = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    answer = answer + [tokenizer.eos_token_id]
    ids = prompt + answer
    labels = list(ids) if train_on_inputs else [IGNORE] * len(prompt) + answer
    truncated = len(ids) > cutoff_len
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "truncated": truncated}


def tokenize_all(tokenizer, examples: list[dict], template: Template, cutoff_len: int,
                 train_on_inputs: bool = False) -> tuple[list[dict], dict]:
    """Tokenize ``examples``; drop (and count) those left with no target token."""
    rows, truncated, dropped = [], 0, 0
    for ex in examples:
        row = tokenize_example(tokenizer, ex, template, cutoff_len, train_on_inputs)
        truncated += row.pop("truncated")
        if all(x == IGNORE for x in row["labels"]):
            dropped += 1
            continue
        rows.append(row)
    lengths = [len(r["input_ids"]) for r in rows]
    stats = {"examples": len(examples), "kept": len(rows), "truncated": truncated,
             "dropped_no_target": dropped,
             "mean_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
             "max_tokens": max(lengths, default=0)}
    return rows, stats


class MaskedCollator:
    """Right-pads a batch (labels with -100) and refuses one with no target.

    A batch whose labels are all -100 gives a loss of 0 (or NaN) and a zero
    gradient: training seems to run but learns nothing. KnowLM's users met it
    as "loss stuck at 0". Here it is an error that says why.
    """

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)

        def pad(key, value):
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])

        batch = {"input_ids": pad("input_ids", self.pad_id),
                 "attention_mask": pad("attention_mask", 0), "labels": pad("labels", IGNORE)}
        if not (batch["labels"] != IGNORE).any():
            raise NoTargetError(
                "this batch has no trainable target token (every label is -100), so its loss "
                "is 0 and nothing is learned. Usual causes: prompts longer than cutoff_len, "
                "empty outputs, or a template whose response is masked too.")
        return batch


# ------------------------------------------------------------------ the mix

def read_category(name: str, data: Path = ROOT / "data_samples") -> list[dict]:
    path = data / "instructions" / f"{name}.jsonl"
    return [rec for _, rec in iter_jsonl(path)]


def mix_counts(total: int, weights: dict[str, float] | None = None) -> dict[str, int]:
    """``total`` examples shared out in proportion to ``weights`` (KnowLM's by default)."""
    weights = dict(KNOWLM_COUNTS if weights is None else weights)
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise InstructError(f"unknown categories {sorted(unknown)}; valid: {list(CATEGORIES)}")
    if total < len(weights) or any(w < 0 for w in weights.values()) or not sum(weights.values()):
        raise InstructError("the mix needs a positive total and non-negative weights")
    whole = sum(weights.values())
    counts = {k: int(total * w / whole) for k, w in weights.items()}
    # largest remainders get the examples lost to rounding
    rest = sorted(weights, key=lambda k: total * weights[k] / whole - counts[k], reverse=True)
    for k in rest[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


# How often each IE task is picked for a sentence that has it: NER three
# times as often as RE or EE. Measured with notebook 03's settings: exact F1
# 0.07 with equal weights, 0.10 with these.
TASK_WEIGHTS = {"NER": 3, "RE": 1, "EE": 1}


# Pieces of realistic-looking names. Real names are ordinary words and
# morphemes put together ("Stanhope Media", "Port Elsin", "远航科技"), while
# names of random syllables ("Moweshex Sawym") all have one odd shape; a
# model tuned on those learns that shape as "a name". WordNames keeps out
# every piece that only the held-out names contain (see name_maker).
_EN_SUFFIX = ["ton", "ford", "ley", "wick", "field", "well", "gate", "worth", "more", "by",
              "dale", "brook", "stead", "hope", "wood", "mere", "holt", "bury", "ridge",
              "haven", "shaw", "combe", "ham", "stone", "low", "moor"]
_EN_HEAD = ["Port", "Lake", "Mount", "New", "North", "South", "East", "West", "Upper",
            "Lower", "Old", "Saint", "Fort", "Glen"]
_EN_PLACE_TAIL = ["Ridge", "Cove", "Point", "Hills", "Vale", "Valley", "Lane", "Wells", "Bay",
                  "Harbour", "Mountains", "Falls", "Island", "Heights", "Crossing", "Springs"]
_EN_ORG_TAIL = ["Systems", "Labs", "Group", "Institute", "Bank", "Foundation", "Works",
                "Partners", "Holdings", "Media", "Trust", "Dairy", "Library", "Guild", "Homes",
                "Marine", "Market", "Museum", "Project", "Line", "School", "Council", "Press",
                "Studio", "Mills", "Energy", "Hospital", "Club", "Orchestra", "Ironworks",
                "Aggregates", "Station", "Society", "Academy", "Airways", "Motors"]
_EN_PRODUCT_TAIL = ["Pro", "One", "Mini", "Max", "Air", "Go", "Plus", "Lite"]
_ZH_CHARS_EXTRA = list("澜溪岭漠源川峰岳磐坤鑫凌翼航沐舒脉宁苍梧桐槐桦枫柳梅松竹兰荷岚霞雾云星辰"
                       "光影青蓝金银铜铁石玉河湖海港湾泉渊崖谷原野丘林森禾麦稻茗墨砚鸢鹭鹤雁")
_ZH_INDUSTRY = ["科技", "智能", "医药", "化工", "物流", "咖啡", "茶业", "控股", "建材", "游戏",
                "银行", "出版社", "家居", "设计", "置业", "建筑", "车队", "食品", "电子", "能源",
                "传媒", "航空", "集团", "研究院", "基金会", "实验室", "有限公司", "大学"]
_ZH_PLACE_TAILS = ["市", "县", "镇", "港", "湾", "山", "岛", "村", "区", "省", "河", "湖",
                   "路", "关", "山脉", "街"]


class WordNames(NameMaker):
    """Fresh names built from ordinary words and morphemes, not random syllables.

    ``words`` are lowercase English words (the sample corpus's) to build
    from; ``banned_words`` never appear in an English name (use the words
    that only the evaluation split's names contain). Given ``zh_seen`` (text
    the model may see: the Chinese corpus and training sentences), a Chinese
    character or name ending is used only if it occurs in it. ``make`` has
    the signature of :meth:`knowlm_nb.tiny.NameMaker.make`, so
    :func:`knowlm_nb.ie.substitute_names` takes either.
    """

    def __init__(self, seed: int = 0, words: Iterable[str] = (), banned_words: Iterable[str] = (),
                 zh_seen: str | None = None):
        super().__init__(seed)
        banned = {w.lower() for w in banned_words}
        self.words = sorted({w for w in words if w.isalpha() and w.isascii() and 3 <= len(w) <= 8
                             and w.lower() not in banned})
        if len(self.words) < 50:
            raise InstructError(f"WordNames needs at least 50 usable words, got {len(self.words)}")
        self.banned = banned

        def allowed(pieces):
            return [x for x in pieces if not set(x.lower().split()) & banned]

        self.heads, self.place_tails = allowed(_EN_HEAD), allowed(_EN_PLACE_TAIL)
        self.org_tails, self.product_tails = allowed(_EN_ORG_TAIL), allowed(_EN_PRODUCT_TAIL)
        self.suffixes = _EN_SUFFIX

        def seen(pieces):
            return list(pieces) if zh_seen is None else [x for x in pieces if x in zh_seen]

        self.zh_chars, self.zh_surnames = seen(dict.fromkeys(_ZH_GIVEN + _ZH_CHARS_EXTRA)), seen(_ZH_SURNAMES)
        self.zh_industry, self.zh_place_tails = seen(_ZH_INDUSTRY), seen(_ZH_PLACE_TAILS)

    def _piece(self) -> str:
        """One capitalised name word: a corpus word, a compound, or invented syllables."""
        r = self.rng
        for _ in range(20):
            u = r.random()
            if u < 0.2:
                w = r.choice(self.words)
            elif u < 0.7:
                w = r.choice(self.words)[: r.randint(3, 6)] + r.choice(self.suffixes)
            else:
                w = self.word()
            if w.lower() not in self.banned:
                return w.title()
        return self.word().title()

    def make(self, kind: str, lang: str = "en") -> str:
        r = self.rng
        if kind == "time" or kind not in self.KINDS:  # times as NameMaker's; it names a bad kind
            return super().make(kind, lang)
        if lang == "zh":
            return self._make_zh(kind)
        p = self._piece
        if kind == "person":
            last = p() if r.random() < 0.8 else f"{p()}-{p()}"
            return f"{p()} {last}"
        if kind == "location":
            u = r.random()
            if u < 0.4:
                return p()
            if u < 0.7:
                return f"{r.choice(self.heads)} {p()}"
            return f"{p()} {r.choice(self.place_tails)}"
        if kind == "organization":
            u = r.random()
            if u < 0.55:
                return f"{p()} {r.choice(self.org_tails)}"
            if u < 0.75:
                return f"{p()} {p()} {r.choice(self.org_tails)}"
            if u < 0.9:
                return f"{r.choice(self.org_tails)} of {p()}"
            return f"{p()}-{p()}"
        u = r.random()
        if u < 0.4:
            return f"{p()}-{r.randint(2, 99)}"
        if u < 0.7:
            return f"{p()} {r.choice(self.product_tails)}"
        return p()

    def _make_zh(self, kind: str) -> str:
        r = self.rng

        def given(lo=1, hi=2):
            return "".join(r.choice(self.zh_chars) for _ in range(r.randint(lo, hi)))

        if kind == "person":
            return r.choice(self.zh_surnames) + given()
        if kind == "location":
            return given(1, 3) + r.choice(self.zh_place_tails)
        if kind == "organization":
            return given(2, 3) + r.choice(self.zh_industry)
        u = r.random()
        if u < 0.5:
            return given(2, 3)
        if u < 0.8:
            return given(2, 3) + r.choice(["Pro", "X", "一号", "二代"])
        return given(1, 2) + r.choice("XYZ") + str(r.randint(2, 99))


def _latin_words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def _name_vocabulary(data: Path) -> tuple[list[str], set[str], str]:
    """What :class:`WordNames` builds from, and what it keeps out.

    (words of the English sample corpus; words that only the held-out names
    contain, in no training sentence and nowhere in the corpus; the Chinese
    corpus and training sentences, where each Chinese piece must occur).
    """
    words: set[str] = set()
    seen: set[str] = set()  # every word of the corpus and of the training sentences
    for path in sorted((data / "corpus").glob("en_*.jsonl")):
        for _, rec in iter_jsonl(path):
            text = rec.get("text", "")
            words |= set(re.findall(r"(?<![A-Za-z])[a-z]+(?![A-Za-z])", text))
            seen |= _latin_words(text)
    train, evaluation = ie.split_records("en", data)
    seen = seen.union(*(_latin_words(rec["text"]) for rec in train))
    held = set().union(*(_latin_words(n) for rec in evaluation for n in ie.names_of(rec)))
    zh_seen = [rec.get("text", "") for path in sorted((data / "corpus").glob("zh_*.jsonl"))
               for _, rec in iter_jsonl(path)]
    zh_seen += [rec["text"] for rec in ie.split_records("zh", data)[0]]
    return sorted(words), held - seen, "\n".join(zh_seen)


NAME_STYLES = ("words", "syllables")


def name_maker(style: str, seed: int, data: Path = ROOT / "data_samples") -> NameMaker:
    """The fresh-name generator of ``style``: ``words`` (:class:`WordNames`) or ``syllables``."""
    if style == "syllables":
        return NameMaker(seed)
    if style == "words":
        words, held_out, zh_seen = _name_vocabulary(data)
        return WordNames(seed, words, held_out, zh_seen)
    raise InstructError(f"unknown name style {style!r}; valid: {list(NAME_STYLES)}")


def _fresh_records(lang: str, seed: int, data: Path, names: str = "words",
                   as_shipped_base: bool = False):
    """The training records of ``lang`` forever: once as written, then with fresh names.

    A copy whose text contains a name of the evaluation split, even inside a
    longer invented name, is drawn again (up to five times).
    ``as_shipped_base``: rename as the code that built the shipped base did
    (times from ``NameMaker.make``, whole spans only; see
    :func:`knowlm_nb.ie.substitute_names`).
    """
    train, evaluation = ie.split_records(lang, data)
    banned = set().union(*(ie.names_of(r) for r in evaluation))
    maker, rng = name_maker(names, seed + (1 if lang == "zh" else 0), data), random.Random(seed)
    order, first_pass = list(train), True
    while True:
        rng.shuffle(order)
        for rec in order:
            if not first_pass:
                for _ in range(5):
                    new = ie.substitute_names(rec, maker, time_shape=not as_shipped_base,
                                              rename_inside=not as_shipped_base)
                    if not any(name in new["text"] for name in banned):
                        rec = new
                        break
            yield rec
        first_pass = False


def fresh_ie_examples(lang: str, n: int, seed: int = 0,
                      data: Path = ROOT / "data_samples",
                      task_weights: dict[str, float] | None = None,
                      names: str = "words") -> list[dict]:
    """``n`` IE instructions from the training sentences of ``lang``.

    Each sentence gives one example, of a task drawn by ``task_weights``
    among those it has annotations for (:data:`TASK_WEIGHTS` by default).
    The first pass uses each sentence as written; after that every copy gets
    freshly invented names (:func:`knowlm_nb.ie.substitute_names`) in the
    style ``names`` (:func:`name_maker`), never one of the evaluation split's
    names.
    """
    weights = TASK_WEIGHTS if task_weights is None else task_weights
    rng = random.Random(seed)
    out: list[dict] = []
    for rec in _fresh_records(lang, seed, data, names):
        if len(out) >= n:
            break
        options = ie.to_instructions(rec)
        out.append(rng.choices(options, [weights.get(x["task"], 1) for x in options])[0])
    return out


COPY_INSTRUCTIONS = {
    "en": "List the names in the text (people, places, organisations, products) in the order "
          "they appear, separated by commas.",
    "zh": "按出现顺序列出文中的名称（人名、地名、机构名、产品名），用逗号隔开。",
}


def _names_in_order(rec: dict) -> list[str]:
    """The record's names (times left out), once each, in the order the text has them."""
    # dict, not set: a set's order changes with the hash seed, and names that
    # start at the same place ("Harrowgate", "Harrowgate Institute") would swap
    return sorted(dict.fromkeys(e["text"] for e in rec["entities"] if e["type"] != "time"),
                  key=rec["text"].find)


def mention_lines(seed: int = 0, zh_share: float = 0.5,
                  data: Path = ROOT / "data_samples") -> Iterator[str]:
    """Endless pretraining lines: an IE *training* sentence, then its names in order.

    "Marta Velling joined Harrowgate Institute. Names mentioned: Marta Velling,
    Harrowgate Institute." The sentences are :func:`_fresh_records` copies
    (as written once, then with fresh names, never a held-out one), so the
    base practises finding and copying names inside real sentences. It is not
    the NER answer format (no types, no prompt), so a base pretrained on it
    still scores 0 before tuning. ``zh_share`` of the lines are Chinese.
    The sentences are renamed as they were when the shipped base was built
    (``as_shipped_base``: times are :meth:`~knowlm_nb.tiny.NameMaker.make`'s
    dates, and a sentence whose event argument holds a name keeps its
    names), so these lines stay the ones its fifth stage was trained on.
    """
    records = {lang: _fresh_records(lang, seed + 100, data, as_shipped_base=True)
               for lang in ("en", "zh")}
    rng = random.Random(seed)
    while True:
        lang = "zh" if rng.random() < zh_share else "en"
        rec = next(records[lang])
        found = _names_in_order(rec)
        if found:
            yield mention_recall(rec["text"], found, lang)


def copy_instructions(n: int, seed: int = 0, data: Path = ROOT / "data_samples",
                      names: str = "words") -> list[dict]:
    """``n`` general instructions that are pure copying, half English, half Chinese.

    "List the names in the text in order": the input is a fresh-name copy of
    an IE training sentence, the answer its names (times left out), exactly
    as written. Like KnowLM's general instructions of this kind, it is not
    the NER answer format, so it teaches copying, not the task.
    """
    out: list[dict] = []
    for lang, k in (("en", n - n // 2), ("zh", n // 2)):
        sep = ", " if lang == "en" else "，"
        rows: list[dict] = []
        for rec in _fresh_records(lang, seed + 7, data, names):
            if len(rows) >= k:
                break
            found = _names_in_order(rec)
            if found:
                rows.append({"id": f"{rec['id']}-copy", "lang": lang, "task": "COPY",
                             "instruction": COPY_INSTRUCTIONS[lang], "input": rec["text"],
                             "output": sep.join(found)})
        out += rows
    return out


def build_mix(total: int, seed: int = 0, val_share: float = 0.05,
              weights: dict[str, float] | None = None,
              data: Path = ROOT / "data_samples",
              copy_share: float = 0.0,
              names: str = "words") -> tuple[list[dict], list[dict], dict]:
    """(train, validation, counts): ``total`` examples in KnowLM's proportions.

    CoT, general and code examples are drawn in turn from the sample files
    (repeating them when the share asks for more); the two IE categories are
    fresh-name copies. ``copy_share`` of the general category are
    :func:`copy_instructions` instead of repeats of the sample file.
    ``names`` is the style of the fresh names (:func:`name_maker`). The
    validation share is split off after shuffling.
    """
    if not 0 <= val_share < 1:
        raise InstructError(f"val_share must be in [0, 1), got {val_share}")
    if not 0 <= copy_share <= 1:
        raise InstructError(f"copy_share must be in [0, 1], got {copy_share}")
    counts = mix_counts(total, weights)
    rng = random.Random(seed)
    rows: list[dict] = []
    for cat, n in counts.items():
        if cat.startswith("ie_"):
            picked = fresh_ie_examples(cat[3:], n, seed, data, names=names)
        else:
            n_copy = round(n * copy_share) if cat == "general" else 0
            pool = read_category(cat, data)
            if not pool and n > n_copy:
                raise InstructError(f"no examples in category {cat!r}")
            rng.shuffle(pool)
            picked = [pool[i % len(pool)] for i in range(n - n_copy)]
            picked += copy_instructions(n_copy, seed, data, names) if n_copy else []
        rows += [dict(r, category=cat) for r in picked]
    rng.shuffle(rows)
    n_val = int(len(rows) * val_share)
    return rows[n_val:], rows[:n_val], counts


def mix_table(counts: dict[str, int]) -> list[dict]:
    """KnowLM's counts beside ours, with both shares."""
    total_k, total = sum(KNOWLM_COUNTS.values()), sum(counts.values())
    return [{"category": c, "KnowLM": KNOWLM_COUNTS[c], "KnowLM %": 100 * KNOWLM_COUNTS[c] / total_k,
             "ours": counts.get(c, 0), "ours %": 100 * counts.get(c, 0) / total}
            for c in CATEGORIES]


# --------------------------------------------------------------- training

def load_base(path: str | Path, load_in_8bit: bool = False):
    """``(tokenizer, model)`` from a local HF folder; 8-bit needs a CUDA GPU."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InstructError(f"no model at {path} (config.json missing)")
    tok = AutoTokenizer.from_pretrained(path)
    if load_in_8bit:
        if not torch.cuda.is_available():
            raise InstructError("load_in_8bit needs a CUDA GPU (bitsandbytes); on CPU train in fp32")
        from transformers import BitsAndBytesConfig

        model = LlamaForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto")
    else:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tok, model


def lora_model(model, r: int, alpha: int, dropout: float, target_modules: list[str],
               load_in_8bit: bool = False, modules_to_save: list[str] | None = None):
    """Wrap ``model`` with LoRA adapters (PEFT); only the adapters train.

    ``modules_to_save`` (e.g. ``["embed_tokens", "lm_head"]``) are trained
    whole, beside the adapters, and saved with them.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if load_in_8bit:
        model = prepare_model_for_kbit_training(model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     modules_to_save=list(modules_to_save) if modules_to_save else None,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


class _ListDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_lora(model, tokenizer, train_rows: list[dict], val_rows: list[dict], out: str | Path,
               learning_rate: float, max_steps: int, micro_batch: int, grad_accum: int = 1,
               epochs: float = 1.0, warmup_steps: int = 30, eval_steps: int = 100,
               seed: int = 0, precision: str = "fp32", progress: bool = True,
               group_by_length: bool = True) -> dict:
    """Train the LoRA ``model`` with the HF Trainer, save the adapter to ``out``.

    ``max_steps`` > 0 wins over ``epochs``. ``group_by_length`` batches
    examples of similar length together (the Trainer's length-grouped
    sampler), so less of each batch is padding: on the ``tiny`` mix 24% fewer
    token positions for the same examples. The adapter is written with
    ``save_pretrained`` into a temporary folder and moved into place, so an
    interrupted run leaves no half adapter. Returns the log history (training
    and validation loss), the seconds and the adapter's size.
    """
    from transformers import Trainer, TrainingArguments

    if not train_rows:
        raise InstructError("no training examples")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    args = TrainingArguments(
        output_dir=str(scratch / "trainer"), per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch, gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate, max_steps=max_steps if max_steps > 0 else -1,
        num_train_epochs=epochs, lr_scheduler_type="cosine", warmup_steps=warmup_steps,
        weight_decay=0.0, logging_steps=max(1, min(25, eval_steps)),
        eval_strategy="steps" if val_rows else "no", eval_steps=eval_steps,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        fp16=precision == "fp16", bf16=precision == "bf16", use_cpu=precision == "fp32" and
        not _cuda(), disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(train_rows),
                      eval_dataset=_ListDataset(val_rows) if val_rows else None,
                      data_collator=MaskedCollator(tokenizer))
    start = time.perf_counter()
    try:
        trainer.train()
        seconds = time.perf_counter() - start
        model.save_pretrained(scratch / "adapter")
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch / "adapter", out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"history": trainer.state.log_history, "seconds": seconds,
            "steps": trainer.state.global_step,
            "adapter_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def loss_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "validation": [(step, loss)]}`` from a Trainer log."""
    return {"train": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "validation": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]}


# ------------------------------------------- reusing a trained adapter (classroom mode)

# Saved beside a trained adapter: what it was trained from, and its loss history.
TRAINING_RECORD = "training.json"
# The notebook-03 parameters that shape the training itself; everything the examples
# depend on (template, mix, names, cutoff, masking, the mix's seed) is in their hash.
TRAINING_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save",
                 "learning_rate", "epochs", "max_steps", "warmup_steps", "micro_batch",
                 "grad_accum", "load_in_8bit", "seed")


def training_fingerprint(base_dir: str | Path, train_rows: list[dict], params: dict) -> dict:
    """What an adapter's training depends on: the base's weights, the examples, the settings."""
    import hashlib

    from . import files

    missing = [k for k in TRAINING_KEYS if k not in params]
    if missing:
        raise InstructError(f"training settings lack {missing}")
    rows = hashlib.sha256()
    for r in train_rows:
        rows.update(json.dumps([r["input_ids"], r["labels"]]).encode())
    return {"base_weights": files.weights_hash(Path(base_dir)), "train_rows": rows.hexdigest(),
            "n_train_rows": len(train_rows), "settings": {k: params[k] for k in TRAINING_KEYS}}


def reuse_refusal(adapter_dir: str | Path, fingerprint: dict) -> str | None:
    """Why the adapter in ``adapter_dir`` cannot stand in for a new training run (None: it can).

    It can when it is complete (``adapter_config.json``, the weights whose
    hash its :data:`TRAINING_RECORD` holds) and was trained from the same
    base weights, the same examples and the same settings (``fingerprint``).
    """
    from . import files

    adapter_dir = Path(adapter_dir)
    record_path = adapter_dir / TRAINING_RECORD
    weights = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        return f"no complete adapter in {adapter_dir}"
    if not record_path.is_file():
        return f"the adapter in {adapter_dir} has no {TRAINING_RECORD} saying what it was trained from"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        saved = record["fingerprint"]
        weights_sha = record["adapter_sha256"]
        record["result"]["seconds"]
    except (ValueError, KeyError, TypeError):
        return f"{record_path} is not a training record"
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return f"{record_path} is not a training record"
    if files.sha256_file(weights) != weights_sha:
        return f"the adapter weights in {adapter_dir} are not the ones its training record names"
    for key, what in [("base_weights", "another base model"), ("train_rows", "other examples"),
                      ("settings", "other settings")]:
        if saved.get(key) != fingerprint[key]:
            if key == "settings":
                what += " (" + ", ".join(f"{k}: {saved[key].get(k)!r} then, {v!r} now"
                                         for k, v in fingerprint[key].items()
                                         if saved[key].get(k) != v) + ")"
            return f"the adapter in {adapter_dir} was trained from {what}"
    return None


def train_or_reuse(model, tokenizer, base_dir: str | Path, train_rows: list[dict],
                   val_rows: list[dict], out: str | Path, params: dict, reuse: bool = False,
                   eval_steps: int = 100, progress: bool = True) -> dict:
    """Train the LoRA ``model`` (:func:`train_lora`), or load the adapter already in ``out``.

    With ``reuse`` and an adapter in ``out`` that :func:`reuse_refusal`
    accepts, its weights are loaded into ``model`` (the same LoRA layout) and
    nothing trains; otherwise it trains with the settings in ``params`` (the
    notebook-03 parameters) and saves :data:`TRAINING_RECORD` beside the
    adapter. Returns :func:`train_lora`'s result (for a reused adapter: the
    one saved when it was trained) with ``tuned`` (did training run now?) and
    ``note`` (one sentence saying which, and why).
    """
    from . import files

    out = Path(out)
    fingerprint = training_fingerprint(base_dir, train_rows, params)
    refusal = reuse_refusal(out, fingerprint) if reuse else "reuse_adapter is off"
    if refusal is None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        loaded = set_peft_model_state_dict(model, load_peft_weights(str(out), device="cpu"))
        if loaded.unexpected_keys:
            raise InstructError(f"the adapter in {out} does not fit this LoRA model: "
                                f"{loaded.unexpected_keys[:3]}")
        record = json.loads((out / TRAINING_RECORD).read_text(encoding="utf-8"))
        res = {**record["result"], "tuned": False,
               "note": f"reused the adapter in {out} (reuse_adapter: same base, examples and "
                       f"settings); it was tuned in {record['result']['seconds'] / 60:.1f} min, "
                       f"nothing was tuned now"}
        return res
    res = train_lora(model, tokenizer, train_rows, val_rows, out, params["learning_rate"],
                     params["max_steps"], params["micro_batch"], params["grad_accum"],
                     params["epochs"], params["warmup_steps"], eval_steps=eval_steps,
                     seed=params["seed"], progress=progress)
    result = {k: res[k] for k in ("history", "seconds", "steps", "adapter_bytes")}
    files.write_json(out / TRAINING_RECORD, {
        "fingerprint": fingerprint, "result": result,
        "adapter_sha256": files.sha256_file(out / "adapter_model.safetensors")})
    return {**res, "tuned": True, "note": f"tuned now ({refusal})"}


def load_adapter(base_dir: str | Path, adapter_dir: str | Path):
    """``(tokenizer, model)``: the base with a saved LoRA adapter on top."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InstructError(f"no LoRA adapter at {adapter_dir} (adapter_config.json missing)")
    tok, base = load_base(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return tok, model


# ------------------------------------------------------------- generation

def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             batch_size: int = 16, constraint=None, num_beams: int = 1) -> list[str]:
    """Greedy (or ``num_beams`` beam-search) completions of ``prompts``, batched.

    Left padding with an attention mask keeps every prompt's last token next
    to its first generated one; ``max_new_tokens`` caps a run-away answer;
    the text is cut at the first EOS. ``constraint``, if given, is called
    as ``constraint(first_prompt_index, padded_width)`` for each batch and
    returns the ``prefix_allowed_tokens_fn`` for it
    (:func:`ner_copy_constraint`).
    """
    import torch

    if max_new_tokens < 1:
        raise InstructError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if num_beams < 1:
        raise InstructError(f"num_beams must be positive, got {num_beams}")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            width = enc["input_ids"].shape[1]
            extra = {"prefix_allowed_tokens_fn": constraint(i, width)} if constraint else {}
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     num_beams=num_beams, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **extra)
            for row in gen[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return outs


# ------------------------------------------------- copy-constrained decoding

def _word_character(ch: str) -> bool:
    """A letter or digit that sits inside a word: not CJK (wide), which has no word breaks."""
    return ch.isalnum() and unicodedata.east_asian_width(ch) not in ("W", "F")


class _NerGrammar:
    """Byte-level automaton of an NER answer whose entities are copied from the input.

    ``(label, span), (label, span)`` or the NONE word: a label is one of
    ``labels``, a span is a non-empty run of the input's bytes without
    parentheses that starts and ends on a whole character and does not cut
    a word (a run of letters and digits other than CJK ones, which have no
    word breaks), and no (label, span) pair comes twice. A state is a tuple;
    :meth:`feed` returns the state after some bytes, or None if they leave
    the grammar.
    """

    def __init__(self, source: str, labels: Iterable[str], none_word: str, whole_words: bool = True):
        self.source = source.encode("utf-8")
        self.heads = [f"{x}, ".encode("utf-8") for x in labels]
        self.none = none_word.encode("utf-8")
        # byte offsets where a span may start or end: between two characters that
        # are not both inside one word ("Philhar|monic" is no place to stop)
        offsets = [0]
        for ch in source:
            offsets.append(offsets[-1] + len(ch.encode("utf-8")))
        cuts = [k for k in range(1, len(source)) if whole_words
                and _word_character(source[k - 1]) and _word_character(source[k])]
        self.bounds = set(offsets) - {offsets[k] for k in cuts}
        # the bytes a span may start with: the first byte after a boundary, no parenthesis
        self.span_starts = {self.source[i] for i in self.bounds if i < len(self.source)} - {
            ord("("), ord(")")}

    START = ("start", b"", b"", frozenset())

    @classmethod
    def for_example(cls, example: dict) -> "_NerGrammar":
        """The grammar of an NER example's answer: its language's labels, its input."""
        lang = example["lang"]
        return cls(example["input"], [ie.label(t, lang) for t in ie.ENTITY_TYPES], ie.NONE[lang])

    def feed(self, state, data: bytes):
        mode, label, got, done = state
        for b in data:
            ch = bytes((b,))
            if mode == "start":
                if ch == b" ":  # one space may lead (a SentencePiece "▁(" has it)
                    if got:
                        return None
                    got = ch
                    continue
                mode, got = ("label", b"") if ch == b"(" else ("none", ch)
                if mode == "none" and not self.none.startswith(got):
                    return None
            elif mode == "none":
                got += ch
                if not self.none.startswith(got):
                    return None
            elif mode == "label":
                got += ch
                if got in self.heads:
                    mode, label, got = "span", got, b""
                elif not any(h.startswith(got) for h in self.heads):
                    return None
            elif mode == "span":
                if ch == b")":
                    pair = (label, got.strip())
                    if not pair[1] or pair in done or not self._occurs(pair[1], whole=True):
                        return None
                    mode, got, done = "sep", b"", done | {pair}
                elif ch == b"(" or not self._occurs(got + ch):
                    return None
                else:
                    got += ch
            else:  # "sep": after a pair, only ", (" may follow
                got += ch
                if got == b", (":
                    mode, got = "label", b""
                elif not b", (".startswith(got):
                    return None
        return mode, label, got, done

    def _occurs(self, span: bytes, whole: bool = False) -> bool:
        """``span`` occurs in the source from a span boundary (and, ``whole``, up to one)."""
        at = self.source.find(span)
        while at != -1:
            if at in self.bounds and (not whole or at + len(span) in self.bounds):
                return True
            at = self.source.find(span, at + 1)
        return False

    def next_bytes(self, state) -> set[int]:
        """The bytes that may follow ``state`` (a superset; :meth:`feed` decides)."""
        mode, _, got, _ = state
        if mode == "start":
            return {ord("("), self.none[0]} | (set() if got else {ord(" ")})
        if mode == "none":
            return {self.none[len(got)]} if len(got) < len(self.none) else set()
        if mode == "label":
            return {h[len(got)] for h in self.heads if h.startswith(got) and len(h) > len(got)}
        if mode == "sep":
            return {b", ("[len(got)]} if len(got) < 3 else set()
        if not got:
            return self.span_starts
        src, n, found, at = self.source, len(got), {ord(")")}, self.source.find(got)
        while at != -1 and at + n < len(src):  # "span": what follows each place it occurs
            found.add(src[at + n])
            at = src.find(got, at + 1)
        return found

    def complete(self, state) -> bool:
        mode, _, got, _ = state
        return (mode == "sep" and not got) or (mode == "none" and got == self.none)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _sentencepiece_bytes(token: str) -> bytes:
    """A SentencePiece token's bytes: "▁" is a space, "<0xE5>" one raw byte."""
    m = _BYTE_TOKEN.fullmatch(token)
    return bytes((int(m.group(1), 16),)) if m else token.replace("\u2581", " ").encode("utf-8")


def _token_bytes_function(tokenizer):
    """token string -> the bytes it stands for, for byte-level BPE (GPT-2, our
    tiny zoo) and SentencePiece (LLaMA) tokenizers."""
    from .tiny import _byte_level_bytes

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in repr(backend.decoder):
        return _byte_level_bytes
    return _sentencepiece_bytes


def _vocabulary_bytes(tokenizer) -> dict[int, bytes]:
    """token id -> its bytes, for every token but the special ones. Added
    tokens (a vocabulary extension, such as whole Chinese characters) stand
    for their own text; the others go through the tokenizer's byte map."""
    specials = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    to_bytes = _token_bytes_function(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {i: t.encode("utf-8") if i in added else to_bytes(t)
            for i, t in enumerate(tokens) if i not in specials}


def _byte_trie(vocab: Iterable[tuple[int, bytes]]):
    """The tokens' bytes as a trie: a node is (children by byte, token ids ending here)."""
    root: tuple[dict, list] = ({}, [])
    for token_id, data in vocab:
        node = root
        for b in data:
            node = node[0].setdefault(b, ({}, []))
        node[1].append(token_id)
    return root


def _viable_tokens(grammar: _NerGrammar, state, node, out: list[int]) -> list[int]:
    """Every token whose bytes keep ``state`` inside the grammar (a walk of the trie)."""
    children = node[0]
    for b in grammar.next_bytes(state):
        child = children.get(b)
        after = None if child is None else grammar.feed(state, bytes((b,)))
        if after is not None:
            out.extend(child[1])
            _viable_tokens(grammar, after, child, out)
    return out


def ner_copy_constraint(tokenizer, examples: list[dict]):
    """A ``constraint`` for :func:`generate`: NER answers that copy their entities.

    With it, decoding may only write a type label of the example's
    language, a span of the example's ``input`` (byte for byte, starting and
    ending on a whole character and never inside a word) and the answer's
    punctuation, then EOS once an answer is complete. The model still picks
    which span and which type, and when to stop; it can no longer write a name
    the text does not contain, half a Chinese character, or half a word
    ("Ellesmere Philhar"). (Generative IE systems such as UIE keep their
    outputs inside the schema the same way.) The allowed tokens are found by
    walking a byte trie of the vocabulary, so only viable prefixes are tried.
    """
    table = _vocabulary_bytes(tokenizer)
    grammars = [_NerGrammar.for_example(ex) for ex in examples]
    trie = _byte_trie(table.items())
    eos = tokenizer.eos_token_id

    def factory(start: int, width: int):
        states: dict[tuple, tuple] = {}  # (row, generated ids) -> grammar state

        def allowed(row: int, ids) -> list[int]:
            gen = tuple(ids[width:].tolist())
            if eos in gen:
                return [eos]
            grammar = grammars[start + row]
            state, last = states.get((row, gen[:-1])), table.get(gen[-1], b"") if gen else b""
            if state is not None:  # one step on from the shorter prefix
                state = grammar.feed(state, last)
            else:
                state = grammar.feed(grammar.START, b"".join(table.get(i, b"") for i in gen))
            if state is None:  # cannot happen from inside the grammar; stop cleanly
                return [eos]
            states[row, gen] = state
            ok = _viable_tokens(grammar, state, trie, [])
            if grammar.complete(state):
                ok.append(eos)
            return ok or [eos]

        return allowed

    return factory


def copy_errors(predictions: list[str], examples: list[dict]) -> dict[str, int]:
    """Count the predicted NER names that are not copies of whole input spans.

    ``{"pairs": all predicted pairs, "not_in_text": names the input does not
    contain (invented), "cut_words": names that are in it only as part of a
    word ("Philhar" of "Philharmonic")}``. Copy-constrained decoding
    (:func:`ner_copy_constraint`) makes both 0.
    """
    counts = {"pairs": 0, "not_in_text": 0, "cut_words": 0}
    for out, ex in zip(predictions, examples, strict=True):
        grammar = _NerGrammar.for_example(ex)
        for _, name in ie.parse_ner(out)[0]:
            counts["pairs"] += 1
            if name not in ex["input"]:
                counts["not_in_text"] += 1
            elif not grammar._occurs(name.encode("utf-8"), whole=True):
                counts["cut_words"] += 1
    return counts


def repeat_rate(model, tokenizer, names: list[str], batch_size: int = 32) -> float:
    """Share of ``names`` the model repeats exactly after ``Repeat after me: <name>.``

    A check of the base alone, before any tuning: can it copy these very
    strings from its context? (The copy pretraining of the shipped base has
    lines of this form, with other, invented names.)
    """
    if not names:
        raise InstructError("no names to repeat")
    longest = max(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names)
    outs = generate(model, tokenizer, [f"Repeat after me: {n}." for n in names],
                    max_new_tokens=longest + 4, batch_size=batch_size)
    return sum(o == n or o.startswith(n + ".") for o, n in zip(outs, names)) / len(names)


def eval_examples(langs: Iterable[str] = ("en", "zh"), task: str = "NER",
                  data: Path = ROOT / "data_samples") -> list[dict]:
    """The held-out IE examples of ``task`` (names never seen in training)."""
    return [rec for lang in langs for _, rec in iter_jsonl(data / "ie" / f"eval_{lang}.jsonl")
            if rec.get("task") == task]


def evaluate_ner(model, tokenizer, examples: list[dict], template: Template,
                 max_new_tokens: int = 64, batch_size: int = 16,
                 copy_constrained: bool = False, num_beams: int = 1) -> tuple[list[str], dict]:
    """Generate an answer for each NER example and score it (exact, partial, type).

    Greedy by default: the model alone. ``copy_constrained`` decodes with
    :func:`ner_copy_constraint`, ``num_beams`` > 1 with beam search.
    """
    prompts = [template.prompt(ex["instruction"], ex["input"]) for ex in examples]
    constraint = ner_copy_constraint(tokenizer, examples) if copy_constrained else None
    preds = generate(model, tokenizer, prompts, max_new_tokens, batch_size, constraint, num_beams)
    scores = ie.score_ner(preds, examples)
    by_lang = {}
    for lang in sorted({ex["lang"] for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex["lang"] == lang]
        by_lang[lang] = ie.score_ner([preds[i] for i in idx], [examples[i] for i in idx])
    scores["by_lang"] = by_lang
    return preds, scores


# --------------------------------------------------------------------- CLI

def tune(base: Path, out: Path, profile: str = "tiny", max_steps: int | None = None,
         mix_total: int | None = None, seed: int | None = None, progress: bool = True) -> dict:
    """Mix, tune and evaluate with the ``03`` settings of ``profile``."""
    from . import config

    p = config.notebook_params(profile, "03")
    seed = p["seed"] if seed is None else seed
    steps = p["max_steps"] if max_steps is None else max_steps
    template = load_template(p["prompt_template"])
    train, val, counts = build_mix(p["mix_total"] if mix_total is None else mix_total, seed,
                                   copy_share=p["copy_share"], names=p["fresh_names"])
    tok, model = load_base(base, p["load_in_8bit"])
    examples = eval_examples()
    _, before = evaluate_ner(model, tok, examples, template, p["max_new_tokens"])
    train_rows, stats = tokenize_all(tok, train, template, p["cutoff_len"], p["train_on_inputs"])
    val_rows, _ = tokenize_all(tok, val, template, p["cutoff_len"], p["train_on_inputs"])
    model = lora_model(model, p["lora_r"], p["lora_alpha"], p["lora_dropout"],
                       p["target_modules"], p["load_in_8bit"], p["modules_to_save"])
    result = train_lora(model, tok, train_rows, val_rows, out, p["learning_rate"], steps,
                        p["micro_batch"], p["grad_accum"], p["epochs"], p["warmup_steps"],
                        seed=seed, progress=progress)
    _, after = evaluate_ner(model, tok, examples, template, p["max_new_tokens"])
    _, decoded = evaluate_ner(model, tok, examples, template, p["max_new_tokens"],
                              copy_constrained=p["copy_constrained"], num_beams=p["num_beams"])
    return {"counts": counts, "tokenize": stats, "before": before, "after": after,
            "after_decoded": decoded,
            "seconds": result["seconds"], "steps": result["steps"],
            "adapter_bytes": result["adapter_bytes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.instruct",
                                 description="LoRA instruction tuning for IE, then F1 before/after.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune")
    t.add_argument("--base", required=True, help="HF model folder (tokenizer inside)")
    t.add_argument("--out", required=True, help="where the LoRA adapter goes")
    t.add_argument("--profile", default="tiny")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--mix-total", type=int)
    t.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    from . import config

    try:
        res = tune(Path(args.base), Path(args.out), args.profile, args.max_steps,
                   args.mix_total, args.seed)
    except (InstructError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
