"""Information-extraction tasks as instructions: NER, RE and EE in en and zh.

This module turns annotated records (``data_samples/ie/annotated_*.jsonl``)
into instruction examples (``instruction``, ``input``, ``output``) and builds
the sample data's train / evaluation split, where no name of an evaluation
record appears anywhere in the training data. Notebook 06 adds the parsers and
scores on top of the same output formats:

    NER  (person, Marta Velling), (location, Port Elsin)
    RE   (Marta Velling, works_for, Harrowgate Institute)
    EE   (Acquisition, acquired, buyer: Northwind; target: Lumen Labs)

An empty answer is ``NONE`` (English) or ``无`` (Chinese).

    python -m knowlm_nb.ie build-samples      # regenerate the committed split
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Iterable

from . import ROOT
from .files import FilesError, iter_jsonl, write_jsonl

ENTITY_TYPES = ["person", "location", "organization", "time", "product"]
RELATIONS = ["born_in", "works_for", "founded_by", "located_in", "capital_of", "member_of",
             "ceo_of", "headquartered_in", "spouse_of", "created"]
EVENT_TYPES = ["Acquisition", "Appointment", "Attack", "Birth", "Death", "Election",
               "Founding", "Meeting", "Sale", "Travel", "Award", "Lawsuit"]

ZH_LABELS = {
    "person": "人物", "location": "地点", "organization": "组织", "time": "时间", "product": "产品",
    "born_in": "出生于", "works_for": "任职于", "founded_by": "创始人", "located_in": "位于",
    "capital_of": "首都", "member_of": "成员", "ceo_of": "首席执行官",
    "headquartered_in": "总部位于", "spouse_of": "配偶", "created": "创作",
    "Acquisition": "收购", "Appointment": "任命", "Attack": "袭击", "Birth": "出生",
    "Death": "死亡", "Election": "选举", "Founding": "成立", "Meeting": "会见", "Sale": "出售",
    "Travel": "出行", "Award": "获奖", "Lawsuit": "诉讼",
}
NONE = {"en": "NONE", "zh": "无"}

TEMPLATES = {
    ("NER", "en"): ("Extract every entity of the types {labels} from the text. Answer as "
                    "(type, entity) pairs separated by commas, or NONE if there is none."),
    ("NER", "zh"): "请从文本中抽取所有类型为{labels}的实体，以（类型, 实体）的形式回答，多个用逗号隔开；没有则回答“无”。",
    ("RE", "en"): ("Find the relations of the types {labels} between entities in the text. "
                   "Answer as (head, relation, tail) triples separated by commas, or NONE."),
    ("RE", "zh"): "请找出文本中实体之间属于{labels}的关系，以（头实体, 关系, 尾实体）的形式回答，多个用逗号隔开；没有则回答“无”。",
    ("EE", "en"): ("Extract the events of the types {labels} from the text. Answer each as "
                   "(event type, trigger, role: argument; role: argument), or NONE."),
    ("EE", "zh"): "请从文本中抽取属于{labels}的事件，每个事件以（事件类型, 触发词, 角色: 论元; 角色: 论元）的形式回答；没有则回答“无”。",
}


class IEDataError(ValueError):
    """A malformed annotated record; the message names it."""


def label(name: str, lang: str) -> str:
    return ZH_LABELS.get(name, name) if lang == "zh" else name


def _labels(names: Iterable[str], lang: str) -> str:
    sep = "、" if lang == "zh" else ", "
    return "[" + sep.join(label(n, lang) for n in names) + "]"


def check_record(rec: dict) -> None:
    """Every span is in the text, every relation joins two of its entities."""
    rid = rec.get("id", "?")
    text = rec.get("text")
    if not isinstance(text, str) or not text:
        raise IEDataError(f"{rid}: no text")
    if rec.get("lang") not in ("en", "zh"):
        raise IEDataError(f"{rid}: lang must be en or zh")
    names = set()
    for ent in rec.get("entities", []):
        if ent.get("type") not in ENTITY_TYPES or ent.get("text") not in text:
            raise IEDataError(f"{rid}: bad entity {ent}")
        names.add(ent["text"])
    for rel in rec.get("relations", []):
        if rel.get("relation") not in RELATIONS or rel.get("head") not in names \
                or rel.get("tail") not in names:
            raise IEDataError(f"{rid}: bad relation {rel}")
    for ev in rec.get("events", []):
        spans = [ev.get("trigger")] + [a.get("text") for a in ev.get("arguments", [])]
        if ev.get("type") not in EVENT_TYPES or not all(isinstance(s, str) and s in text for s in spans):
            raise IEDataError(f"{rid}: bad event {ev}")


def format_output(task: str, rec: dict) -> str:
    lang = rec["lang"]
    if task == "NER":
        items = [f"({label(e['type'], lang)}, {e['text']})" for e in rec.get("entities", [])]
    elif task == "RE":
        items = [f"({r['head']}, {label(r['relation'], lang)}, {r['tail']})"
                 for r in rec.get("relations", [])]
    elif task == "EE":
        items = []
        for ev in rec.get("events", []):
            args = "; ".join(f"{a['role']}: {a['text']}" for a in ev.get("arguments", []))
            items.append(f"({label(ev['type'], lang)}, {ev['trigger']}, {args})")
    else:
        raise ValueError(f"unknown task {task!r}; expected NER, RE or EE")
    return ", ".join(items) if items else NONE[lang]


def to_instructions(rec: dict) -> list[dict]:
    """One NER example per record, plus RE and EE where the record has them."""
    check_record(rec)
    lang = rec["lang"]
    tasks = [("NER", ENTITY_TYPES)]
    if rec.get("relations"):
        tasks.append(("RE", RELATIONS))
    if rec.get("events"):
        tasks.append(("EE", EVENT_TYPES))
    out = []
    for task, names in tasks:
        out.append({
            "id": f"{rec['id']}-{task.lower()}", "category": f"ie_{lang}", "lang": lang,
            "task": task, "instruction": TEMPLATES[(task, lang)].format(labels=_labels(names, lang)),
            "input": rec["text"], "output": format_output(task, rec),
            "gold": {k: rec.get(k, []) for k in ("entities", "relations", "events")}[
                {"NER": "entities", "RE": "relations", "EE": "events"}[task]],
        })
    return out


def names_of(rec: dict) -> set[str]:
    """The names an evaluation record must not share with training (times excluded)."""
    return {e["text"] for e in rec.get("entities", []) if e["type"] != "time"}


def split_heldout(records: list[dict], other_texts: list[str], eval_share: float = 0.3,
                  salt: str = "knowlm-nb") -> tuple[list[dict], list[dict]]:
    """Pick about ``eval_share`` of the records (30%) for evaluation, deterministically.

    A candidate stays in evaluation only if none of its names occurs in any
    training record or in ``other_texts`` (the corpus and the other
    instruction sets); otherwise it goes back to training.
    """
    def draw(rec):
        digest = hashlib.sha256(f"{salt}:{rec['id']}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < eval_share

    candidates = [r for r in records if draw(r)]
    train = [r for r in records if not draw(r)]
    while True:  # moving a record to train can expose another candidate's names
        haystack = "\n".join(other_texts + [r["text"] for r in train])
        leaked = [r for r in candidates if any(n in haystack for n in names_of(r))]
        if not leaked:
            return train, candidates
        ids = {r["id"] for r in leaked}
        train += leaked
        candidates = [r for r in candidates if r["id"] not in ids]


# ------------------------------------------------------- fresh-name copies

def substitute_names(rec: dict, maker, types: Iterable[str] = ENTITY_TYPES) -> dict:
    """A copy of ``rec`` with every entity of ``types`` renamed, consistently.

    Each entity string gets a freshly invented one of the same type and
    language (``maker`` is a :class:`knowlm_nb.names.NameMaker`), everywhere:
    text, entities, relation heads and tails, event arguments. Training on
    such copies teaches the model to *copy* names from the input, because no
    name repeats often enough to be memorised. Triggers and other arguments
    (prices, numbers) are kept. A time keeps its shape ("Tuesday" becomes
    another weekday, "2021年" another year: ``maker.time_like``). A name
    inside a longer span (the argument "fans of Rookwood Athletic") is
    renamed there too.
    """
    check_record(rec)
    lang = rec["lang"]
    mapping: dict[str, str] = {}
    for ent in rec.get("entities", []):
        if ent["type"] in types and ent["text"] not in mapping:
            mapping[ent["text"]] = (maker.time_like(ent["text"]) if ent["type"] == "time"
                                    else maker.make(ent["type"], lang))
    if not mapping:
        return dict(rec)
    # replace longest first through placeholders, so "Harrowgate" inside
    # "Harrowgate Institute" is not renamed twice
    order = sorted(mapping, key=len, reverse=True)

    def swap(span: str) -> str:
        for i, old in enumerate(order):
            span = span.replace(old, f"\x00{i}\x00")
        for i, old in enumerate(order):
            span = span.replace(f"\x00{i}\x00", mapping[old])
        return span

    out = dict(rec, text=swap(rec["text"]),
               entities=[dict(e, text=swap(e["text"])) for e in rec.get("entities", [])],
               relations=[dict(r, head=swap(r["head"]), tail=swap(r["tail"]))
                          for r in rec.get("relations", [])],
               events=[dict(ev, arguments=[dict(a, text=swap(a["text"])) for a in ev["arguments"]])
                       for ev in rec.get("events", [])])
    try:
        check_record(out)  # a renamed span may have vanished inside another one
    except IEDataError:
        return dict(rec)
    return out


# ------------------------------------------------------- parsing and scoring

_TYPE_OF_LABEL = {**{t: t for t in ENTITY_TYPES},
                  **{ZH_LABELS[t]: t for t in ENTITY_TYPES}}
_PAIR = re.compile(r"\(\s*([^,()]+?)\s*,\s*([^()]+?)\s*\)")


def parse_ner(output: str) -> tuple[list[tuple[str, str]], bool]:
    """``"(person, Marta Velling), (location, Port Elsin)"`` -> pairs, well_formed.

    Chinese labels map back to the English types. ``NONE`` / ``无`` is an
    empty, well-formed answer. Anything left over, or an unknown type, makes
    the answer not well-formed; the pairs that do parse are still returned.
    """
    text = output.strip()
    if text in NONE.values():
        return [], True
    pairs, rest, ok = [], _PAIR.sub("", text), True
    for label_, entity in _PAIR.findall(text):
        kind = _TYPE_OF_LABEL.get(label_.strip())
        if kind is None:
            ok = False
            continue
        pairs.append((kind, entity.strip()))
    if rest.replace(",", "").replace("，", "").strip() or not pairs:
        ok = False
    return pairs, ok


def gold_pairs(example: dict) -> list[tuple[str, str]]:
    """The (type, entity) pairs of an NER example's ``gold``."""
    return [(g["type"], g["text"]) for g in example["gold"]]


def _units(text: str) -> list[str]:
    """Words for English, characters for Chinese (for partial-match overlap)."""
    if re.search(r"[\u4e00-\u9fff]", text):
        return [c for c in text if not c.isspace()]
    return text.lower().split()


def _overlap_f1(a: str, b: str) -> float:
    from collections import Counter

    ua, ub = Counter(_units(a)), Counter(_units(b))
    common = sum((ua & ub).values())
    if not common:
        return 0.0
    p, r = common / sum(ua.values()), common / sum(ub.values())
    return 2 * p * r / (p + r)


def _prf(tp: float, n_pred: int, n_gold: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def score_ner(predictions: list[str], examples: list[dict]) -> dict:
    """Micro scores of NER outputs against the examples' gold pairs.

    * ``exact``: a predicted (type, entity) counts when the same pair is gold
      (multisets per example, micro-averaged);
    * ``partial``: each prediction earns the best token-overlap F1 with a
      not-yet-matched gold entity of its type;
    * ``type``: the multisets of types alone;
    * ``well_formed``: share of outputs that parse completely.
    """
    from collections import Counter

    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    tp = partial = type_tp = 0.0
    n_pred = n_gold = well = 0
    for out, ex in zip(predictions, examples):
        pred, ok = parse_ner(out)
        gold = gold_pairs(ex)
        well += ok
        n_pred += len(pred)
        n_gold += len(gold)
        tp += sum((Counter(pred) & Counter(gold)).values())
        type_tp += sum((Counter(t for t, _ in pred) & Counter(t for t, _ in gold)).values())
        free = list(gold)
        for kind, ent in pred:
            cands = [(_overlap_f1(ent, g), i) for i, (t, g) in enumerate(free) if t == kind]
            if cands:
                best, i = max(cands)
                if best > 0:
                    partial += best
                    free.pop(i)
    n = len(examples)
    return {"exact": _prf(tp, n_pred, n_gold), "partial": _prf(partial, n_pred, n_gold),
            "type": _prf(type_tp, n_pred, n_gold), "well_formed": well / n if n else 0.0,
            "examples": n, "predicted": n_pred, "gold": n_gold}


def _read_jsonl(path: Path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


def _other_texts(data: Path) -> list[str]:
    other = [r["text"] for p in sorted((data / "corpus").glob("*.jsonl")) for r in _read_jsonl(p)]
    for name in ("cot", "general", "code"):
        path = data / "instructions" / f"{name}.jsonl"
        if path.is_file():
            other += [f"{r.get('instruction', '')}\n{r.get('input', '')}\n{r.get('output', '')}"
                      for r in _read_jsonl(path)]
    return other


def split_records(lang: str, data: Path = ROOT / "data_samples",
                  other: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """The annotated ``lang`` records, split into (train, evaluation) as committed."""
    records = _read_jsonl(data / "ie" / f"annotated_{lang}.jsonl")
    for rec in records:
        check_record(rec)
    return split_heldout(records, _other_texts(data) if other is None else other)


def build_samples(data: Path = ROOT / "data_samples", write: bool = True) -> dict[str, list[dict]]:
    """Regenerate ``instructions/ie_{en,zh}.jsonl`` and ``ie/eval_{en,zh}.jsonl``."""
    other = _other_texts(data)
    files = {}
    for lang in ("en", "zh"):
        train, evaluation = split_records(lang, data, other)
        files[f"instructions/ie_{lang}.jsonl"] = [x for r in train for x in to_instructions(r)]
        files[f"ie/eval_{lang}.jsonl"] = [x for r in evaluation for x in to_instructions(r)]
    if write:
        for rel, rows in files.items():
            write_jsonl(data / rel, rows)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.ie")
    ap.add_argument("command", choices=["build-samples"])
    ap.parse_args(argv)
    try:
        files = build_samples()
    except (IEDataError, FilesError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rel, rows in files.items():
        print(f"{rel}: {len(rows)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
