"""IE formats for the whole course: NER, RE and EE instructions, answers, parsers and scores.

What this shared module holds (stages 03 and 06 use it; it imports only shared modules):

* the data: annotated records (``data_samples/ie/annotated_*.jsonl``) turned
  into instruction examples (:func:`to_instructions`) and the train /
  evaluation split where no name of an evaluation record appears anywhere in
  the training data (:func:`build_samples`); fresh-name copies
  (:func:`substitute_names`);
* prompts: :func:`build_prompt` ``(task, lang, schema, text, style)`` with
  several phrasings per task and language in two output styles, KnowLM's
  natural-language tuples (``"tuple"``) and IEPile / OneKE's JSON with an
  explicit schema (``"json"``); :func:`format_answer` writes a gold answer in
  either style;
* reading answers: :func:`parse` ``(task, output, style)`` -> records and
  problems, tolerant of what models really write and never raising;
  :func:`parse_ner` is 03's strict NER reading (with ``well_formed``);
* scoring: :func:`score` (micro P/R/F1, per type, set or multiset; EE on
  triggers and on arguments), the one scorer of the course; 03's
  :func:`score_ner` is a thin layer on it; :func:`eval_subset` picks held-out
  examples, :func:`restyle` asks them in either style, :func:`evaluate`
  parses and scores a batch of answers (the model call is the caller's:
  ``knowlm_nb.widgets``).

The tuple style, as 03 trains it::

    NER  (person, Marta Velling), (location, Port Elsin)
    RE   (Marta Velling, works_for, Harrowgate Institute)
    EE   (Acquisition, acquired, buyer: Northwind; target: Lumen Labs)

An empty answer is ``NONE`` (English) or ``无`` (Chinese). The JSON style::

    NER  {"person": ["Marta Velling"], "location": ["Port Elsin"]}
    RE   {"works_for": [{"subject": "Marta Velling", "object": "Harrowgate Institute"}]}
    EE   {"Acquisition": [{"trigger": "acquired", "arguments": {"buyer": "Northwind"}}]}

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
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    parsed = [parse_ner(out) for out in predictions]
    preds = [pairs for pairs, _ in parsed]
    golds = [gold_pairs(ex) for ex in examples]
    # exact and type F1 are the course's one scorer (score), multiset matching
    exact = score("NER", golds, preds)
    types = score("NER", [[(t, "") for t, _ in g] for g in golds],
                  [[(t, "") for t, _ in p] for p in preds])
    partial = 0.0
    for pred, gold in zip(preds, golds):
        free = list(gold)
        for kind, ent in pred:
            cands = [(_overlap_f1(ent, g), i) for i, (t, g) in enumerate(free) if t == kind]
            if cands:
                best, i = max(cands)
                if best > 0:
                    partial += best
                    free.pop(i)
    n = len(examples)
    first = ("precision", "recall", "f1")
    return {"exact": {k: exact[k] for k in first},
            "partial": _prf(partial, exact["predicted"], exact["gold"]),
            "type": {k: types[k] for k in first},
            "well_formed": sum(ok for _, ok in parsed) / n if n else 0.0,
            "examples": n, "predicted": exact["predicted"], "gold": exact["gold"]}


# ------------------------------------------------ schemas, phrasings, prompts

TASKS = ("NER", "RE", "EE")
STYLES = ("tuple", "json")
LANGS = ("en", "zh")

# the roles each event type takes in the sample data (its annotation guide)
EVENT_ROLES = {
    "Acquisition": ["buyer", "target", "price", "time", "place"],
    "Appointment": ["person", "position", "organization", "time", "place"],
    "Attack": ["target", "victim", "place", "time"],
    "Award": ["winner", "award", "organization", "time", "place"],
    "Birth": ["person", "place", "time"],
    "Death": ["person", "place", "time"],
    "Election": ["winner", "position", "organization", "place", "time"],
    "Founding": ["founder", "organization", "place", "time"],
    "Lawsuit": ["plaintiff", "defendant", "place", "time"],
    "Meeting": ["participant", "place", "time"],
    "Sale": ["seller", "buyer", "item", "price", "time"],
    "Travel": ["traveler", "origin", "destination", "time"],
}
ROLE_ZH = {
    "buyer": "买方", "target": "目标", "price": "价格", "time": "时间", "place": "地点",
    "person": "人物", "position": "职位", "organization": "组织", "victim": "受害者",
    "winner": "获胜者", "award": "奖项", "founder": "创办者", "plaintiff": "原告",
    "defendant": "被告", "participant": "参与者", "seller": "卖方", "item": "物品",
    "traveler": "出行者", "origin": "出发地", "destination": "目的地",
}

# Several phrasings per (task, lang, style). The first tuple phrasing is the
# one 03 trains on (TEMPLATES); the JSON ones follow IEPile / OneKE's wording.
PHRASINGS: dict[tuple[str, str, str], list[str]] = {
    ("NER", "en", "tuple"): [
        TEMPLATES[("NER", "en")],
        "List the {labels} entities mentioned in the text as (type, entity), comma-separated; "
        "write NONE if there are none.",
        "Which entities of the types {labels} does this text mention? Reply with (type, entity) "
        "pairs, or NONE.",
    ],
    ("NER", "zh", "tuple"): [
        TEMPLATES[("NER", "zh")],
        "找出下面文本中属于{labels}的实体，按（类型, 实体）格式列出，用逗号分隔；若没有，回答“无”。",
        "文本里提到了哪些{labels}类型的实体？请以（类型, 实体）回答，没有则回答“无”。",
    ],
    ("RE", "en", "tuple"): [
        TEMPLATES[("RE", "en")],
        "List every relation of the types {labels} stated in the text as (head, relation, tail); "
        "write NONE if there is none.",
        "Which {labels} relations hold between the entities of this text? Reply with (head, "
        "relation, tail) triples, or NONE.",
    ],
    ("RE", "zh", "tuple"): [
        TEMPLATES[("RE", "zh")],
        "列出文本中所有属于{labels}的关系，格式为（头实体, 关系, 尾实体），用逗号分隔；若没有，回答“无”。",
        "这段文本中的实体之间有哪些{labels}关系？请以（头实体, 关系, 尾实体）回答，没有则回答“无”。",
    ],
    ("EE", "en", "tuple"): [
        TEMPLATES[("EE", "en")],
        "Find the events of the types {labels} in the text and write each as (event type, "
        "trigger, role: argument; role: argument), using the roles {roles}; NONE if there is none.",
        "Which {labels} events does this text report? One (event type, trigger, role: argument; "
        "...) per event, or NONE.",
    ],
    ("EE", "zh", "tuple"): [
        TEMPLATES[("EE", "zh")],
        "找出文本中属于{labels}的事件，每个写成（事件类型, 触发词, 角色: 论元; 角色: 论元），角色取自{roles}；若没有，回答“无”。",
        "这段文本报道了哪些{labels}事件？每个事件以（事件类型, 触发词, 角色: 论元; ...）回答，没有则回答“无”。",
    ],
    ("NER", "en", "json"): [
        "You are an expert in named entity recognition. Please extract entities that match the "
        "schema definition from the input. Return an empty list if the entity type does not "
        "exist. Please respond in the format of a JSON string.",
        "Extract the entities of the schema's types from the input. Answer with a JSON object "
        "mapping each type to a list of entity strings (an empty list when there is none).",
    ],
    ("NER", "zh", "json"): [
        "你是专门进行实体抽取的专家。请从input中抽取出符合schema定义的实体，不存在的实体类型返回空列表。请按照JSON字符串的格式回答。",
        "请从input中抽取schema所列类型的实体，以JSON对象回答：每个类型对应一个实体字符串列表，没有则为空列表。",
    ],
    ("RE", "en", "json"): [
        "You are an expert in relation extraction. Please extract relation triples that match "
        "the schema definition from the input. Return an empty list for relations that do not "
        "exist. Please respond in the format of a JSON string.",
        "Extract the schema's relations from the input. Answer with a JSON object mapping each "
        "relation to a list of {\"subject\": ..., \"object\": ...} (an empty list when there is none).",
    ],
    ("RE", "zh", "json"): [
        "你是专门进行关系抽取的专家。请从input中抽取出符合schema定义的关系三元组，不存在的关系返回空列表。请按照JSON字符串的格式回答。",
        "请从input中抽取schema所列的关系，以JSON对象回答：每个关系对应一个{\"subject\": ..., \"object\": ...}列表，没有则为空列表。",
    ],
    ("EE", "en", "json"): [
        "You are an expert in event extraction. Please extract events from the input that "
        "conform to the schema definition. Return an empty list for events that do not exist, "
        "and return NAN for arguments that do not exist. If an argument has multiple values, "
        "please return a list. Respond in the format of a JSON string.",
        "Extract the schema's events from the input. Answer with a JSON object mapping each event "
        "type to a list of {\"trigger\": ..., \"arguments\": {role: argument}}.",
    ],
    ("EE", "zh", "json"): [
        "你是专门进行事件提取的专家。请从input中抽取出符合schema定义的事件，不存在的事件返回空列表，不存在的论元返回NAN，如果论元存在多值请返回列表。请按照JSON字符串的格式回答。",
        "请从input中抽取schema所列的事件，以JSON对象回答：每个事件类型对应一个{\"trigger\": ..., \"arguments\": {角色: 论元}}列表。",
    ],
}

_FIELD = {"NER": "entities", "RE": "relations", "EE": "events"}


def default_schema(task: str):
    """The course's schema of ``task``: entity types, relation types, or event type -> roles."""
    _check_task(task)
    if task == "NER":
        return list(ENTITY_TYPES)
    if task == "RE":
        return list(RELATIONS)
    return {t: list(EVENT_ROLES[t]) for t in EVENT_TYPES}


def _check_task(task) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def check_schema(task: str, schema=None):
    """A normalised copy of ``schema`` (None = :func:`default_schema`); a clear error if bad.

    NER and RE take a list of type names; EE a mapping of event type to its
    roles (a plain list of event types, or an empty role list, gets the roles
    of :data:`EVENT_ROLES`).
    """
    _check_task(task)
    if schema is None:
        return default_schema(task)
    if task == "EE":
        if isinstance(schema, (list, tuple)):
            schema = {t: EVENT_ROLES.get(t, []) for t in schema}
        if not isinstance(schema, dict) or not schema:
            raise ValueError("an EE schema is a non-empty mapping of event type to its roles")
        out = {}
        for name, roles in schema.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"event type must be a non-empty string, got {name!r}")
            if not isinstance(roles, (list, tuple)) or not all(isinstance(r, str) and r.strip()
                                                               for r in roles):
                raise ValueError(f"roles of {name!r} must be a list of strings, got {roles!r}")
            canon = _canonical(name.strip(), "EE")  # no roles given: the course's, if it knows the type
            out[canon] = [r.strip() for r in roles] or list(EVENT_ROLES.get(canon, []))
        return out
    if isinstance(schema, str) or not isinstance(schema, (list, tuple)) or not schema:
        raise ValueError(f"a {task} schema is a non-empty list of type names, got {schema!r}")
    if not all(isinstance(t, str) and t.strip() for t in schema):
        raise ValueError(f"every {task} type must be a non-empty string, got {schema!r}")
    return list(dict.fromkeys(_canonical(t.strip(), task) for t in schema))


def _schema_names(task: str, schema) -> list[str]:
    return list(schema) if task != "EE" else list(schema.keys())


def build_prompt(task: str, lang: str, schema, text: str, style: str = "tuple",
                 phrasing: int = 0) -> dict:
    """An instruction example for ``text``: ``{"instruction", "input", "task", "lang", "style"}``.

    ``style="tuple"`` asks for KnowLM's natural-language tuples (phrasing 0 is
    exactly the instruction 03 trains on); ``style="json"`` follows IEPile /
    OneKE: the instruction is a JSON object with the instruction, the schema
    and the input, and ``input`` is empty. Wrap it in a prompt template
    (``instruct.load_template(...).prompt(instruction, input)``) to generate.
    """
    _check_task(task)
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected en or zh")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected tuple or json")
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    schema = check_schema(task, schema)
    options = PHRASINGS[(task, lang, style)]
    if not isinstance(phrasing, int) or not 0 <= phrasing < len(options):
        raise ValueError(f"phrasing must be 0..{len(options) - 1} for {task}/{lang}/{style}")
    phrase = options[phrasing]
    names = _schema_names(task, schema)
    if style == "tuple":
        roles = sorted({r for t in names for r in schema[t]}) if task == "EE" else []
        instruction = phrase.format(labels=_labels(names, lang), roles="[" + ", ".join(roles) + "]")
        return {"task": task, "lang": lang, "style": style, "instruction": instruction,
                "input": text}
    if task == "EE":
        json_schema = [{"event_type": label(t, lang), "trigger": True,
                        "arguments": [_role_label(r, lang) for r in schema[t]]} for t in names]
    else:
        json_schema = [label(t, lang) for t in names]
    instruction = json.dumps({"instruction": phrase, "schema": json_schema, "input": text},
                             ensure_ascii=False)
    return {"task": task, "lang": lang, "style": style, "instruction": instruction, "input": ""}


def _role_label(role: str, lang: str) -> str:
    return ROLE_ZH.get(role, role) if lang == "zh" else role


def gold_records(task: str, gold: list[dict]) -> list[tuple]:
    """The records of an example's ``gold`` annotations (the form :func:`parse` returns)."""
    _check_task(task)
    if task == "NER":
        return [(g["type"], g["text"]) for g in gold]
    if task == "RE":
        return [(g["head"], g["relation"], g["tail"]) for g in gold]
    return [(g["type"], g["trigger"], tuple((a["role"], a["text"]) for a in g.get("arguments", [])))
            for g in gold]


def format_answer(task: str, lang: str, records: list[tuple], style: str = "tuple") -> str:
    """``records`` written as a model should answer, in ``style``."""
    _check_task(task)
    if style == "tuple":
        if task == "NER":
            items = [f"({label(t, lang)}, {s})" for t, s in records]
        elif task == "RE":
            items = [f"({h}, {label(r, lang)}, {t})" for h, r, t in records]
        else:
            items = [f"({label(t, lang)}, {trig}, " + "; ".join(f"{r}: {a}" for r, a in args) + ")"
                     for t, trig, args in records]
        return ", ".join(items) if items else NONE[lang]
    out: dict[str, list] = {}
    for rec in records:
        if task == "NER":
            out.setdefault(label(rec[0], lang), []).append(rec[1])
        elif task == "RE":
            out.setdefault(label(rec[1], lang), []).append({"subject": rec[0], "object": rec[2]})
        else:
            args: dict[str, object] = {}
            for role, arg in rec[2]:
                key = _role_label(role, lang)
                args[key] = [*args[key], arg] if isinstance(args.get(key), list) else (
                    [args[key], arg] if key in args else arg)
            out.setdefault(label(rec[0], lang), []).append({"trigger": rec[1], "arguments": args})
    return json.dumps(out, ensure_ascii=False)


# ------------------------------------------------------------ tolerant parser

MAX_OUTPUT_CHARS = 20_000   # a longer answer is cut before parsing (a problem says so)
MAX_JSON_DEPTH = 32         # deeper JSON is not an answer (and would exhaust the stack)

_NONE_WORDS = {"none", "无", "没有", "n/a", "null", "nan", "[]", "{}", "no entities", "nothing"}
_FENCE = re.compile(r"```[ \t]*[A-Za-z]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")
_ITEM = re.compile(r"[(（]([^()（）]*)[)）]")
_OPEN_TAIL = re.compile(r"[(（]([^()（）]*)\Z")
_COMMA = re.compile(r"\s*[,，]\s*")
_FIRST_SEP = re.compile(r"\s*[,，:：]\s*")
_ARG_SPLIT = re.compile(r"\s*[;；]\s*|\s*[,，]\s*(?=[A-Za-z_\u4e00-\u9fff]{1,20}\s*[:：])")
_ROLE_SEP = re.compile(r"\s*[:：]\s*")
_QUOTES = "\"'“”‘’「」『』《》`"


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().strip(_QUOTES).strip()).lower()


def _lookup(task: str) -> dict[str, str]:
    """Every spelling of a type name of ``task`` (English, Chinese, any case) -> the name."""
    names = {"NER": ENTITY_TYPES, "RE": RELATIONS, "EE": EVENT_TYPES}[task]
    table = {}
    for n in names:
        table[_key(n)] = n
        table[_key(ZH_LABELS.get(n, n))] = n
    return table


_LOOKUPS = {t: _lookup(t) for t in ("NER", "RE", "EE")}
_ROLE_LOOKUP = {**{_key(r): r for r in ROLE_ZH}, **{_key(z): r for r, z in ROLE_ZH.items()}}


def _canonical(name: str, task: str) -> str:
    """The course's name of a type label in either language; an unknown label as written."""
    return _LOOKUPS[task].get(_key(name), name.strip())


def _type_in(name: str, task: str, allowed: dict[str, str]) -> str | None:
    key = _key(name)
    canon = _LOOKUPS[task].get(key, name.strip())
    return allowed.get(_key(canon)) or allowed.get(key)


def _clean_span(span: str) -> str:
    span = span.strip()
    while len(span) >= 2 and span[0] in _QUOTES and span[-1] in _QUOTES:
        span = span[1:-1].strip()
    return span


def _as_text(output, problems: list[str]) -> str | None:
    if isinstance(output, (bytes, bytearray)):
        output = bytes(output).decode("utf-8", errors="replace")
        problems.append("output was bytes; decoded as UTF-8 with replacements")
    if not isinstance(output, str):
        problems.append(f"output is not text ({type(output).__name__})")
        return None
    if len(output) > MAX_OUTPUT_CHARS:
        problems.append(f"output of {len(output)} characters cut to {MAX_OUTPUT_CHARS}")
        output = output[:MAX_OUTPUT_CHARS]
    if _CONTROL.search(output):
        problems.append("control characters removed")
        output = _CONTROL.sub("", output)
    fenced = _FENCE.search(output)
    if fenced:
        problems.append("answer inside a code fence")
        output = fenced.group(1)
    return output.strip()


def _is_none(text: str) -> bool:
    return _key(text.rstrip("。.!！ ")) in _NONE_WORDS


def parse(task: str, output, style: str = "tuple", schema=None) -> tuple[list[tuple], list[str]]:
    """Read a model's answer: ``(records, problems)``; never raises on model output.

    Records are ``(type, span)`` for NER, ``(head, relation, tail)`` for RE,
    ``(event_type, trigger, ((role, argument), ...))`` for EE, with types
    named as in the course's schema whichever language the label was written
    in (``人物`` -> ``person``). Labels outside ``schema`` (default: the
    course's) are dropped. ``problems`` lists what was odd: prose around the
    answer, a code fence, a truncated item or JSON, an unknown label, bytes,
    an answer in the other style (it is read anyway), ... Duplicates are kept
    (the scorer decides); ``NONE`` / ``无`` is an empty answer with no problem.
    """
    problems: list[str] = []
    try:
        _check_task(task)
        schema = check_schema(task, schema)
    except ValueError as exc:
        return [], [str(exc)]
    try:
        text = _as_text(output, problems)
        if text is None:
            return [], problems
        if not text:
            return [], problems + ["empty output"]
        if _is_none(text):
            return [], problems
        allowed = {_key(n): n for n in _schema_names(task, schema)}
        first, second = (_parse_tuples, _parse_json) if style != "json" else (_parse_json, _parse_tuples)
        if style not in STYLES:
            problems.append(f"unknown style {style!r}; read as tuple")
        records, found = first(task, text, allowed, problems)
        if not found:
            extra: list[str] = []
            records, found = second(task, text, allowed, extra)
            if found:
                other = "JSON" if first is _parse_tuples else "tuples"
                problems += [f"answered in {other}, not the style asked for"] + extra
            else:
                problems.append("no answer found")
        return records, problems
    except Exception as exc:  # the contract: model output never raises
        return [], problems + [f"unreadable output ({type(exc).__name__})"]


def _parse_tuples(task: str, text: str, allowed: dict, problems: list[str]) -> tuple[list, bool]:
    items = _ITEM.findall(text)
    rest = _ITEM.sub(" ", text)
    tail = _OPEN_TAIL.search(rest)
    if tail and tail.group(1).strip():
        items.append(tail.group(1))
        problems.append(f"truncated last item: {tail.group(0)[:60]!r}")
        rest = rest[:tail.start()]
    leftover = re.sub(r"[\s,，、;；.。]|\band\b|和", "", rest)
    if items and leftover:
        problems.append(f"text outside the answer: {rest.strip()[:60]!r}")
    records = []
    for raw in items:
        rec = (_ner_item, _re_item, _ee_item)[TASKS.index(task)](raw, allowed, problems)
        if rec is not None:
            records.append(rec)
    return records, bool(items)


def _ner_item(raw: str, allowed: dict, problems: list[str]):
    parts = _FIRST_SEP.split(raw.strip(), maxsplit=1)
    if len(parts) < 2 or not parts[1].strip():
        problems.append(f"not a (type, entity) pair: {raw[:60]!r}")
        return None
    kind = _type_in(parts[0], "NER", allowed)
    if kind is None:
        problems.append(f"unknown entity type {parts[0][:30]!r}")
        return None
    span = _clean_span(parts[1])
    return (kind, span) if span else None


def _re_item(raw: str, allowed: dict, problems: list[str]):
    parts = _COMMA.split(raw.strip())
    if len(parts) < 3:
        problems.append(f"not a (head, relation, tail) triple: {raw[:60]!r}")
        return None
    for j in range(1, len(parts) - 1):
        rel = _type_in(parts[j], "RE", allowed)
        if rel is not None:
            head, tail = _clean_span(", ".join(parts[:j])), _clean_span(", ".join(parts[j + 1:]))
            return (head, rel, tail) if head and tail else None
    problems.append(f"unknown relation in {raw[:60]!r}")
    return None


def _ee_item(raw: str, allowed: dict, problems: list[str]):
    parts = _COMMA.split(raw.strip(), maxsplit=2)
    if len(parts) < 2 or not parts[1].strip():
        problems.append(f"not an (event type, trigger, ...) item: {raw[:60]!r}")
        return None
    kind = _type_in(parts[0], "EE", allowed)
    if kind is None:
        problems.append(f"unknown event type {parts[0][:30]!r}")
        return None
    args = []
    for piece in _ARG_SPLIT.split(parts[2]) if len(parts) > 2 else []:
        if not piece.strip():
            continue
        role_arg = _ROLE_SEP.split(piece.strip(), maxsplit=1)
        if len(role_arg) < 2 or not role_arg[1].strip():
            problems.append(f"argument without a role: {piece[:40]!r}")
            continue
        args.append((_ROLE_LOOKUP.get(_key(role_arg[0]), _key(role_arg[0])),
                     _clean_span(role_arg[1])))
    return (kind, _clean_span(parts[1]), tuple(args))


# JSON: find it, load it, repair it when cut off or written with full-width punctuation

def _json_candidates(text: str, problems: list[str]):
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return
    body = text[start:]
    if start and text[:start].strip():
        problems.append(f"text before the JSON: {text[:start].strip()[:60]!r}")
    yield body, None
    fixed = body
    for a, b in (("“", '"'), ("”", '"'), ("｛", "{"), ("｝", "}"), ("［", "["), ("］", "]")):
        fixed = fixed.replace(a, b)
    fixed = re.sub(r'"\s*：', '":', fixed)
    fixed = re.sub(r'([\]}"\d])\s*[，、]\s*(?=["\[{\d])', r"\1,", fixed)
    if fixed != body:
        yield fixed, "full-width punctuation in the JSON"


def _depth_ok(text: str) -> bool:
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _load_json(text: str, problems: list[str]):
    """The first JSON value in ``text`` (``None`` if there is none), repaired if cut off."""
    import ast

    decoder = json.JSONDecoder()
    for body, note in _json_candidates(text, problems):
        if not _depth_ok(body):
            problems.append(f"JSON nested deeper than {MAX_JSON_DEPTH}; not read")
            return None
        try:
            value, end = decoder.raw_decode(body)
            if body[end:].strip():
                problems.append(f"text after the JSON: {body[end:].strip()[:60]!r}")
            if note:
                problems.append(note)
            return value
        except (ValueError, RecursionError):
            pass
        try:
            value = ast.literal_eval(body)
            if isinstance(value, (dict, list)):
                problems.append("Python literal, not JSON")
                return value
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
        value = _repair_json(body)
        if value is not None:
            problems.append("truncated JSON, closed after its last complete value")
            if note:
                problems.append(note)
            return value
    return None


def _repair_json(body: str, tries: int = 40):
    """Cut ``body`` after a complete value and close what is open; the longest that loads."""
    from collections import deque

    stack: list[str] = []
    cuts: deque = deque(maxlen=tries)
    in_str = esc = False
    for i, ch in enumerate(body):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                cuts.append((i + 1, "".join(stack)))
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}":
            if not stack:
                break
            stack.pop()
            cuts.append((i + 1, "".join(stack)))
            if not stack:
                break
    for end, open_ in reversed(cuts):
        try:
            return json.loads(body[:end] + open_[::-1])
        except (ValueError, RecursionError):
            continue
    return None


def _strings(value) -> list[str]:
    """A JSON value as argument strings: a list flattens, NAN / null / "" vanish."""
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if value is None or isinstance(value, (dict, bool)):
        return []
    text = _clean_span(str(value))
    return [] if not text or _key(text) in {"nan", "none", "null", "无"} else [text]


def _first(d: dict, *names):
    for n in names:
        if n in d:
            return d[n]
    return None


def _parse_json(task: str, text: str, allowed: dict, problems: list[str]) -> tuple[list, bool]:
    value = _load_json(text, problems)
    if value is None:
        return [], False
    records: list = []
    if isinstance(value, dict):
        inner = _first(value, "entities", "entity", "relations", "events", "实体", "关系", "事件")
        if isinstance(inner, list):
            value = inner
    if isinstance(value, dict):
        for name, items in value.items():
            kind = _type_in(str(name), task, allowed)
            if kind is None:
                problems.append(f"unknown {task} type {str(name)[:30]!r}")
                continue
            for item in items if isinstance(items, list) else [items]:
                records += _json_item(task, kind, item, allowed, problems)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                name = _first(item, "type", "label", "entity_type", "event_type", "relation",
                              "predicate", "relation_type", "类型", "关系", "事件类型")
                kind = _type_in(str(name), task, allowed) if name is not None else None
                if kind is None:
                    problems.append(f"item without a known type: {str(item)[:60]!r}")
                    continue
                records += _json_item(task, kind, item, allowed, problems)
            elif isinstance(item, list) and task != "EE" and len(item) in (2, 3):
                rec = _ner_item(", ".join(map(str, item)), allowed, problems) if task == "NER" \
                    else _re_item(", ".join(map(str, item)), allowed, problems)
                if rec:
                    records.append(rec)
            else:
                problems.append(f"not a record: {str(item)[:60]!r}")
    else:
        problems.append(f"JSON {type(value).__name__} is not an answer")
    return records, True


def _json_item(task: str, kind: str, item, allowed: dict, problems: list[str]) -> list:
    if task == "NER":
        if isinstance(item, dict):
            item = _first(item, "text", "entity", "span", "name", "mention", "实体")
        return [(kind, s) for s in _strings(item)]
    if not isinstance(item, dict):
        problems.append(f"{task} item is not an object: {str(item)[:60]!r}")
        return []
    if task == "RE":
        heads = _strings(_first(item, "subject", "head", "头实体", "主体"))
        tails = _strings(_first(item, "object", "tail", "尾实体", "客体"))
        return [(h, kind, t) for h in heads for t in tails]
    triggers = _strings(_first(item, "trigger", "event_trigger", "触发词"))
    if not triggers:
        problems.append(f"{kind} event without a trigger")
        return []
    raw = _first(item, "arguments", "args", "论元")
    args = []
    if isinstance(raw, dict):
        args = [(_ROLE_LOOKUP.get(_key(r), _key(r)), a) for r, v in raw.items() for a in _strings(v)]
    elif isinstance(raw, list):
        for a in raw:
            if isinstance(a, dict):
                role = _first(a, "role", "角色")
                args += [(_ROLE_LOOKUP.get(_key(str(role)), _key(str(role))), s)
                         for s in _strings(_first(a, "argument", "text", "论元"))] if role else []
    return [(kind, triggers[0], tuple(args))]


# ------------------------------------------------------------------- scoring

def _match_units(task: str, records: list[tuple], part: str) -> list[tuple[str, tuple]]:
    """(type, unit) pairs to match: EE's ``part`` is "trigger" or "argument"."""
    if task == "NER":
        return [(r[0], tuple(r)) for r in records]
    if task == "RE":
        return [(r[1], tuple(r)) for r in records]
    if part == "trigger":
        return [(r[0], (r[0], r[1])) for r in records]
    return [(r[0], (r[0], role, arg)) for r in records for role, arg in r[2]]


def _micro(task: str, golds: list[list], preds: list[list], match: str, part: str = "") -> dict:
    from collections import Counter

    tp = n_pred = n_gold = 0
    by_type: dict[str, list[int]] = {}
    for gold, pred in zip(golds, preds):
        g, p = Counter(_match_units(task, gold, part)), Counter(_match_units(task, pred, part))
        if match == "set":
            g, p = Counter(set(g)), Counter(set(p))
        hit = g & p
        tp += sum(hit.values())
        n_pred += sum(p.values())
        n_gold += sum(g.values())
        for counter, slot in ((hit, 0), (p, 1), (g, 2)):
            for (kind, _), n in counter.items():
                by_type.setdefault(kind, [0, 0, 0])[slot] += n
    out = _prf(tp, n_pred, n_gold)
    out.update(tp=tp, predicted=n_pred, gold=n_gold)
    out["per_type"] = {k: {**_prf(*v), "tp": v[0], "predicted": v[1], "gold": v[2]}
                       for k, v in sorted(by_type.items())}
    return out


def score(task: str, golds: list[list[tuple]], preds: list[list[tuple]],
          match: str = "multiset") -> dict:
    """Micro precision, recall and F1 of ``preds`` against ``golds``, one list of records per example.

    NER and RE: ``{"precision", "recall", "f1", "tp", "predicted", "gold",
    "per_type": {type: {...}}}``; a record counts when the very same record is
    gold in the same example. EE: ``{"trigger": {...}, "argument": {...}}``,
    triggers as ``(event_type, trigger)`` and arguments as ``(event_type,
    role, argument)``. ``match="multiset"`` counts a record predicted twice
    twice (it can match two gold copies); ``"set"`` counts it once. No
    prediction (or no gold) gives 0, not a division by zero.
    """
    _check_task(task)
    if match not in ("multiset", "set"):
        raise ValueError(f"match must be 'multiset' or 'set', got {match!r}")
    if len(golds) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} examples")
    if task == "EE":
        return {"trigger": _micro(task, golds, preds, match, "trigger"),
                "argument": _micro(task, golds, preds, match, "argument")}
    return _micro(task, golds, preds, match)


def headline(task: str, scores: dict) -> dict:
    """The figures of a :func:`score` result as one flat row (EE: both levels)."""
    if task == "EE":
        return {"trigger_f1": scores["trigger"]["f1"], "argument_f1": scores["argument"]["f1"],
                "f1": scores["argument"]["f1"]}
    return {"precision": scores["precision"], "recall": scores["recall"], "f1": scores["f1"]}


def eval_subset(task: str, lang: str, n: int | None = None,
                data: Path = ROOT / "data_samples") -> list[dict]:
    """``n`` held-out examples of ``task`` in ``lang`` (all if None), spread over the file."""
    _check_task(task)
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected en or zh")
    rows = [rec for _, rec in iter_jsonl(data / "ie" / f"eval_{lang}.jsonl") if rec.get("task") == task]
    if n is None or n >= len(rows):
        return rows
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return [rows[i * len(rows) // n] for i in range(n)]


def restyle(example: dict, style: str, phrasing: int = 0) -> dict:
    """An evaluation example asked in ``style`` (tuple phrasing 0 is the example as it is)."""
    prompt = build_prompt(example["task"], example["lang"], None, example["input"], style, phrasing)
    return {**example, **prompt, "output": format_answer(
        example["task"], example["lang"], gold_records(example["task"], example["gold"]), style)}


def evaluate(task: str, examples: list[dict], outputs: list, style: str = "tuple",
             match: str = "multiset") -> dict:
    """Parse ``outputs`` (one per example) and score them against the examples' gold.

    ``{"scores": score(...), "records": [...], "golds": [...], "problems": [...], "clean": share
    of outputs read without a problem}``.
    """
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
    parsed = [parse(task, out, style) for out in outputs]
    golds = [gold_records(task, ex["gold"]) for ex in examples]
    preds = [records for records, _ in parsed]
    return {"scores": score(task, golds, preds, match), "records": preds, "golds": golds,
            "problems": [problems for _, problems in parsed],
            "clean": sum(not p for _, p in parsed) / len(parsed) if parsed else 0.0}


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
