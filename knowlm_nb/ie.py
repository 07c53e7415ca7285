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
import sys
from pathlib import Path
from typing import Iterable

from . import ROOT
from .tiny import ZooError, iter_jsonl

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


def _read_jsonl(path: Path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def build_samples(data: Path = ROOT / "data_samples", write: bool = True) -> dict[str, list[dict]]:
    """Regenerate ``instructions/ie_{en,zh}.jsonl`` and ``ie/eval_{en,zh}.jsonl``."""
    other = [r["text"] for p in sorted((data / "corpus").glob("*.jsonl")) for r in _read_jsonl(p)]
    for name in ("cot", "general", "code"):
        path = data / "instructions" / f"{name}.jsonl"
        if path.is_file():
            other += [f"{r.get('instruction', '')}\n{r.get('input', '')}\n{r.get('output', '')}"
                      for r in _read_jsonl(path)]
    files = {}
    for lang in ("en", "zh"):
        records = _read_jsonl(data / "ie" / f"annotated_{lang}.jsonl")
        for rec in records:
            check_record(rec)
        train, evaluation = split_heldout(records, other)
        files[f"instructions/ie_{lang}.jsonl"] = [x for r in train for x in to_instructions(r)]
        files[f"ie/eval_{lang}.jsonl"] = [x for r in evaluation for x in to_instructions(r)]
    if write:
        for rel, rows in files.items():
            _write_jsonl(data / rel, rows)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.ie")
    ap.add_argument("command", choices=["build-samples"])
    ap.parse_args(argv)
    try:
        files = build_samples()
    except (IEDataError, ZooError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rel, rows in files.items():
        print(f"{rel}: {len(rows)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
