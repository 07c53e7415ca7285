"""The copy-pretraining recipe that built the shipped base ``data_samples/tiny_base``.

Extraction is copying: the answer's names are spans of the input. A tiny
model only learns to extract names it has never seen if its base can
already copy from its context (induction heads). This module is the recipe
that taught the shipped base to copy, kept so that it can be read and rebuilt;
:mod:`knowlm_nb.tiny` only loads its result.

* :func:`copy_lines` - text where every name slot gets a freshly invented
  name, so the only way to predict a name's second mention is to copy its
  first one; :func:`zh_clauses` gives it Chinese filler and
  :func:`mention_lines` IE training sentences followed by their names.
* :func:`repeat_rows` - random-token spans repeated 2-4 times;
  :func:`packed_blocks` packs lines into fixed-size token blocks.
* :func:`induction_probe` - the loss on the second copy of a made-up span.
* :func:`pretrain_copy_base` trains one stage; :data:`COPY_STAGES` are the
  shipped stages; :func:`ship_copy_base` runs them (or resumes) and
  :func:`save_shipped` writes the fp16 weights, ``recipe.json`` and the
  :func:`model_card`.

Measured recipe: ../shared/notes/tiny-ie-recipe.md.

CLI (114 min on 2 cores for the shipped stages, as its recipe.json records)::

    python -m knowlm_nb.copybase --zoo runs/tiny/00-random --out data_samples/tiny_base [--resume DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

from . import ROOT, ie
from .files import atomic_dir, iter_jsonl, sha256_file, weights_hash
from .names import NameMaker, fresh_records
from .tiny import (MANIFEST, MODEL_KEYS, SHIPPED_RECIPE, ZooError, build_model, build_zoo,
                   count_parameters, model_config, zoo_settings)

_FILLER = ("the a an of in on at to from with and but or so then later after before "
           "during while because every some many few old new big small red blue green "
           "quiet loud early late happy busy river garden market station window "
           "letter story music paper bridge winter summer morning evening city "
           "village road house table book friend family teacher doctor farmer "
           "walks reads writes sings moves opens closes finds keeps sends builds "
           "visits meets sees hears likes wants needs gives takes makes").split()


def zh_clauses(data: Path = ROOT / "data_samples" / "corpus") -> list[str]:
    """Clauses (4-30 characters) of the Chinese sample corpus: filler for Chinese copy lines."""
    out = []
    for path in sorted(Path(data).glob("zh_*.jsonl")):
        for _, rec in iter_jsonl(path):
            out += [c.strip() for c in re.split(r"[，。；！？：\n]", rec.get("text", ""))
                    if 4 <= len(c.strip()) <= 30]
    if not out:
        raise ZooError(f"no Chinese clauses in {data}/zh_*.jsonl")
    return out


# Mention recall: a text, then the names it mentions in order (cue, separator, end).
MENTION_CUES = {"en": (" Names mentioned: ", ", ", "."), "zh": ("文中提到的名字：", "、", "。")}


def mention_recall(text: str, names: list[str], lang: str) -> str:
    cue, sep, end = MENTION_CUES[lang]
    return text + cue + sep.join(names) + end


def _zh_copy_line(maker, clauses: list[str]) -> str:
    """One Chinese line of the six kinds :func:`copy_lines` makes, names freshly invented."""
    r = maker.rng

    def name():
        return maker.make(r.choice(maker.KINDS), "zh")

    def clause():
        return r.choice(clauses)

    u = r.random()
    a, b, c = maker.make("person", "zh"), maker.make("location", "zh"), maker.make("organization", "zh")
    if u < 0.20:
        return r.choice([f"{clause()}，{a}在{b}加入了{c}。", f"{a}出生于{b}，{clause()}。",
                         f"{c}宣布，{a}将在{b}{clause()}。"])
    if u < 0.40:
        return f"{a}在{b}的{c}工作。{clause()}。后来，{a}离开了{b}。"
    if u < 0.55:
        span = "".join(name() if r.random() < 0.6 else clause() for _ in range(r.randint(2, 5)))
        return f"{span} {r.choice(['|', '::', '->', ';'])} {span}"
    if u < 0.65:
        x = name()
        return f"请重复：{x}。{x}。"
    if u < 0.80:
        return f"{a}住在{b}。{clause()}。{a}住在哪里？{b}。"
    names = [name() for _ in range(r.randint(1, 3))]
    body = "，".join(f"{clause()}{x}" for x in names)
    return mention_recall(f"{body}。", names, "zh")


def copy_lines(n: int, seed: int = 0, words: list[str] | None = None,
               zh_share: float = 0.0, clauses: list[str] | None = None,
               sentences: Iterator[str] | None = None,
               sentence_share: float = 0.0) -> Iterator[str]:
    """``n`` lines of copy-rich English text; every name freshly invented.

    Shares follow the measured recipe: 20% template sentences or word salad,
    20% two sentences mentioning the same names, 15% induction spans
    (a made-up span, a separator, the same span), 10% "Repeat after me",
    15% key-value recall, 20% "Names mentioned: ..." recall. Names are
    English-like and, one time in four, Chinese: copying is about token
    identity, whatever the script. ``zh_share`` of the lines are the same
    kinds in Chinese (:func:`zh_clauses` as filler), so the model also learns
    how Chinese text is built from byte-level pieces. ``sentence_share`` of
    the lines are taken from ``sentences`` instead (the last stage of the
    shipped base uses :func:`mention_lines`).
    """
    maker = NameMaker(seed)
    r = maker.rng

    def filler(k):
        return " ".join(r.choice(_FILLER) for _ in range(k))

    def sentence(a, b, c):
        return r.choice([
            f"{a} moved to {b} in the {r.choice(['spring', 'autumn'])} and joined {c}.",
            f"Yesterday {a} met a friend from {b} near the {r.choice(_FILLER)} of {c}.",
            f"{c} hired {a}, who grew up in {b}.",
            f"In {b}, {a} {r.choice(['reads', 'writes', 'sings', 'builds'])} {filler(3)} for {c}.",
        ])

    if zh_share and clauses is None:
        clauses = zh_clauses()
    if sentence_share and sentences is None:
        raise ZooError("sentence_share > 0 needs a sentences iterator")
    for _ in range(n):
        if sentence_share and r.random() < sentence_share:
            yield next(sentences)
            continue
        if zh_share and r.random() < zh_share:
            yield _zh_copy_line(maker, clauses)
            continue
        u = r.random()
        if u < 0.20:
            if r.random() < 0.5:
                yield sentence(maker.make("person", r.choice(["en", "zh"])), maker.make("location"),
                               maker.make("organization"))
            else:
                yield f"{filler(r.randint(4, 10))} {maker.any()} {filler(r.randint(3, 8))}."
        elif u < 0.40:
            a, b, c = maker.any(), maker.make("location"), maker.any()
            yield f"{sentence(a, b, c)} Later, {a} {filler(2)} {c} again in {b}."
        elif u < 0.55:
            if words and r.random() < 0.5:  # single-token words: the classic induction task
                span = " ".join(r.choice(words) for _ in range(r.randint(3, 16)))
            else:
                span = " ".join(maker.word() if r.random() < 0.8 else maker.any("zh")
                                for _ in range(r.randint(3, 12)))
            yield f"{span} {r.choice(['|', '::', '->', ';'])} {span}"
        elif u < 0.65:
            x = maker.any()
            yield f"Repeat after me: {x}. {x}."
        elif u < 0.80:
            pairs = [(maker.make("person", r.choice(["en", "zh"])), maker.make("location"))
                     for _ in range(r.randint(1, 3))]
            facts = " ".join(f"{k} lives in {v}." for k, v in pairs)
            k, v = r.choice(pairs)
            yield f"{facts} {filler(r.randint(2, 6))}. Where does {k} live? {v}."
        else:
            names = [maker.any() for _ in range(r.randint(1, 3))]
            body = " ".join(f"{filler(r.randint(2, 5))} {x}" for x in names)
            yield mention_recall(f"{body}.", names, "en")


def packed_blocks(tokenizer, lines: Iterable[str], block: int) -> Iterator[list[int]]:
    """Token blocks of exactly ``block`` ids: lines joined, each ended by EOS."""
    buf: list[int] = []
    for line in lines:
        buf.extend(tokenizer(line)["input_ids"] + [tokenizer.eos_token_id])
        while len(buf) >= block:
            yield buf[:block]
            buf = buf[block:]


def repeat_rows(tokenizer, n: int, block: int, rng) -> list[list[int]]:
    """``n`` rows of random-token spans, each repeated 2-4 times: pure induction practice.

    Nothing in a random span can be predicted except by finding its earlier
    copy, so these rows reward exactly the attention pattern that copying
    needs, whatever the script of the tokens.
    """
    specials = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in specials]
    rows = []
    for _ in range(n):
        row: list[int] = []
        while len(row) < block:
            span = [rng.choice(ids) for _ in range(rng.randint(4, 32))]
            row += [tokenizer.bos_token_id] + span * rng.randint(2, 4) + [tokenizer.eos_token_id]
        rows.append(row[:block])
    return rows


def vocab_words(tokenizer) -> list[str]:
    """Whole-word ASCII tokens of the vocabulary (single tokens after a space)."""
    return sorted({t[1:] for t in tokenizer.get_vocab()
                   if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() and len(t) > 2})


def induction_probe(model, tokenizer, n: int = 24, seed: int = 12345) -> float:
    """Loss on the second copy of a made-up span (nats/token); low = can copy."""
    import torch

    maker = NameMaker(seed)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            span = tokenizer(" ".join(maker.word() for _ in range(8)),
                             add_special_tokens=False)["input_ids"]
            ids = [tokenizer.bos_token_id] + span + span
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            first = 1 + len(span)  # predict the second copy's tokens (after its first)
            logp = torch.log_softmax(logits[first:-1].float(), -1)
            target = torch.tensor(ids[first + 1:])
            total -= logp.gather(1, target[:, None]).sum().item()
            count += len(target)
    model.train()
    return total / count


def pretrain_copy_base(model, tokenizer, steps: int = 1500, batch_size: int = 16,
                       block: int = 192, lr: float = 2e-3, warmup: int = 100,
                       seed: int = 0, probe_every: int = 100, repeat_share: float = 0.25,
                       zh_share: float = 0.0, sentence_share: float = 0.0,
                       progress: bool = True, log=None) -> list[dict]:
    """Pretrain ``model`` in place for copying; returns the history.

    Each batch is ``repeat_share`` rows of :func:`repeat_rows` and the rest
    :func:`copy_lines` text. AdamW (betas 0.9/0.95, weight decay 0.01),
    clip 1.0, linear warmup then cosine. Every ``probe_every`` steps the
    history gets the training loss and the :func:`induction_probe`, which
    drops abruptly when copying appears; ``log`` (a callable) gets each entry.
    ``sentence_share`` of the text lines are mention-recall lines over the IE
    training sentences (:func:`mention_lines`).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    sentences = None
    if sentence_share:
        sentences = mention_lines(seed)
    lines = copy_lines(10**9, seed, vocab_words(tokenizer), zh_share,
                       sentences=sentences, sentence_share=sentence_share)
    blocks = packed_blocks(tokenizer, lines, block)
    n_repeat = round(batch_size * repeat_share)
    history = [{"step": 0, "loss": None, "probe": induction_probe(model, tokenizer)}]
    running = []
    bar = tqdm(range(1, steps + 1), desc="copy pretraining", disable=not progress)
    for step in bar:
        rows = repeat_rows(tokenizer, n_repeat, block, rng)
        rows += [next(blocks) for _ in range(batch_size - n_repeat)]
        ids = torch.tensor(rows)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % probe_every == 0 or step == steps:
            history.append({"step": step, "loss": sum(running) / len(running),
                            "probe": induction_probe(model, tokenizer)})
            running = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.2f}", probe=f"{history[-1]['probe']:.2f}")
            if log:
                log(history[-1])
    model.eval()
    return history


# The stages the shipped base was made with: each continues the last at a fresh
# learning rate and on a fresh stream of lines.
COPY_STAGES = [
    {"steps": 3000, "batch_size": 16, "block": 192, "lr": 3e-3, "warmup": 100,
     "repeat_share": 0.25, "seed": 0},
    {"steps": 1500, "batch_size": 16, "block": 192, "lr": 2e-3, "warmup": 50,
     "repeat_share": 0.25, "seed": 1},
    # Copying appears near step 3,500 and is still sloppy 1,000 steps later
    # (probe ~0.7); a third stage at a lower rate sharpens it.
    {"steps": 2000, "batch_size": 16, "block": 192, "lr": 1e-3, "warmup": 50,
     "repeat_share": 0.25, "seed": 2},
    # Tuned on Chinese IE, a base that never saw Chinese sentences writes
    # broken byte pieces; half the lines of this stage are Chinese.
    {"steps": 1000, "batch_size": 16, "block": 192, "lr": 1e-3, "warmup": 50,
     "repeat_share": 0.25, "seed": 3, "zh_share": 0.5},
    # Copying a name out of a real sentence is harder than out of a template:
    # half the lines of this stage are IE training sentences followed by their
    # names ("... Names mentioned: A, B."), with fresh names, never a held-out one.
    {"steps": 2000, "batch_size": 16, "block": 192, "lr": 1e-3, "warmup": 50,
     "repeat_share": 0.25, "seed": 4, "zh_share": 0.5, "sentence_share": 0.5},
]



# The renaming the fifth stage's sentences got when the shipped base was built
# (frozen here so that mention_lines stays the lines that base was trained on):
# every name, times included, becomes one of NameMaker.make's names or dates
# (today's renaming keeps a time's shape), and a sentence with a name inside a
# longer event argument ("fans of Rookwood Athletic") stays as written (today's
# renames it there too).

class _Dates:
    """A name maker whose fresh times are ``make``'s dates, not ``time_like``'s shapes."""

    def __init__(self, maker: NameMaker, lang: str):
        self.maker, self.lang = maker, lang

    def make(self, kind: str, lang: str = "en") -> str:
        return self.maker.make(kind, lang)

    def time_like(self, old: str) -> str:
        return self.maker.make("time", self.lang)


def _rename_as_shipped(rec: dict, maker: NameMaker) -> dict:
    """``rec`` renamed as the code that built the shipped base renamed it (see above)."""
    new = ie.substitute_names(rec, _Dates(maker, rec["lang"]))
    names = {e["text"] for e in rec.get("entities", [])}
    args = [a["text"] for ev in rec.get("events", []) for a in ev["arguments"]]
    if any(a not in names and any(n in a for n in names) for a in args):
        return dict(rec)
    return new


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
    Harrowgate Institute." The sentences are :func:`knowlm_nb.names.fresh_records` copies
    (as written once, then with fresh names, never a held-out one), so the
    base practises finding and copying names inside real sentences. It is not
    the NER answer format (no types, no prompt), so a base pretrained on it
    still scores 0 before tuning. ``zh_share`` of the lines are Chinese.
    The sentences are renamed as they were when the shipped base was built
    (:func:`_rename_as_shipped`: times are :meth:`~knowlm_nb.names.NameMaker.make`'s
    dates, and a sentence whose event argument holds a name keeps its
    names), so these lines stay the ones its fifth stage was trained on.
    """
    records = {lang: fresh_records(lang, seed + 100, data, rename=_rename_as_shipped)
               for lang in ("en", "zh")}
    rng = random.Random(seed)
    while True:
        lang = "zh" if rng.random() < zh_share else "en"
        rec = next(records[lang])
        found = _names_in_order(rec)
        if found:
            yield mention_recall(rec["text"], found, lang)




def ship_copy_base(out: Path, zoo_dir: Path, stages: list[dict] | None = None,
                   progress: bool = True, resume: Path | None = None) -> dict:
    """Pretrain the zoo's random base through ``stages`` (:data:`COPY_STAGES`); save it.

    Writes fp16 safetensors, the tokenizer, ``recipe.json`` (tokenizer hash,
    shape, stages, the loss / induction-probe history) and a model card,
    atomically. ``resume``: a base saved by this function whose stages are
    the first ones of ``stages``; only the remaining stages run, from its
    (fp16) weights, and its history is kept.
    """
    import time

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    zoo_dir = Path(zoo_dir)
    stages = COPY_STAGES if stages is None else stages
    from . import preflight  # a wrong local path: the project's 'not found'
    tok = AutoTokenizer.from_pretrained(
        preflight.require(zoo_dir / "tokenizer", "tokenizer"), local_files_only=True)
    zoo = json.loads((zoo_dir / MANIFEST).read_text(encoding="utf-8"))
    dims = {k: zoo["recipe"][k] for k in MODEL_KEYS}
    tok_sha = sha256_file(zoo_dir / "tokenizer" / "tokenizer.json")
    history, done, minutes, todo, resumed = [], 0, 0.0, list(stages), None
    if resume is not None:
        if not (Path(resume) / SHIPPED_RECIPE).is_file():
            raise ZooError(f"cannot resume from {resume}: no {SHIPPED_RECIPE} there")
        prior = json.loads((Path(resume) / SHIPPED_RECIPE).read_text(encoding="utf-8"))
        k = len(prior["stages"])
        if (prior["stages"] != stages[:k] or prior["tokenizer_sha256"] != tok_sha
                or prior["dims"] != dims or k >= len(stages)):
            raise ZooError(f"cannot resume from {resume}: its stages, tokenizer or shape are not "
                           f"a first part of the requested recipe")
        model = LlamaForCausalLM.from_pretrained(resume, dtype=torch.float32, local_files_only=True)
        history, done, minutes, todo = prior["history"], sum(s["steps"] for s in stages[:k]), \
            prior["minutes"], stages[k:]
        resumed = prior.get("resumed", []) + [{"from_stages": k,
                                               "weights_sha256": prior["weights_sha256"]}]
    else:
        model = build_model(model_config(tok, **dims), stages[0]["seed"])
    start = time.perf_counter()
    for stage in todo:
        part = pretrain_copy_base(model, tok, progress=progress, **stage)
        history += [dict(h, step=h["step"] + done) for h in (part if not history else part[1:])]
        done += stage["steps"]
    minutes += (time.perf_counter() - start) / 60
    info = {"tokenizer_sha256": tok_sha, "dims": dims, "vocab_size": len(tok),
            "parameters": count_parameters(model), "stages": stages,
            "minutes": round(minutes, 1), "history": history}
    if resumed:
        info["resumed"] = resumed
    return save_shipped(out, model, tok, info)


def model_card(info: dict) -> str:
    """The shipped base's README: what it is, how it was made, how to rebuild it."""
    h = info["history"]
    def stage_line(i, r):
        zh = f", {r['zh_share']:.0%} Chinese lines" if r.get("zh_share") else ""
        if r.get("sentence_share"):
            zh += f", {r['sentence_share']:.0%} mention-recall lines over IE training sentences"
        return (f"- stage {i}: {r['steps']} steps of batch {r['batch_size']} × {r['block']} tokens "
                f"({r['repeat_share']:.0%} repeat rows{zh}), AdamW lr {r['lr']}, {r['warmup']} "
                f"warmup steps then cosine, data seed {r['seed']};")

    stages = "\n".join(stage_line(i, r) for i, r in enumerate(info["stages"], 1))
    for res in info.get("resumed", []):
        k = res["from_stages"]
        stages += (f"\n- stage {k + 1} onward continued from the fp16 weights saved after stage {k} "
                   f"(sha256 `{res['weights_sha256'][:16]}…`, `--resume`);")
    first, last = h[0], h[-1]
    drop = next((x["step"] for x in h if x["probe"] < 2.0), None)
    crossing = (f"; below 2.0 from step {drop}" if drop is not None else
                " (never below 2.0: it copies, but not perfectly)")
    return f"""# tiny_base: a copy-capable tiny Llama (the course's stand-in for LLaMA)

A `LlamaForCausalLM` of {info['parameters']:,} parameters (hidden {info['dims']['hidden_size']},
{info['dims']['num_layers']} layers, {info['dims']['num_heads']} heads, MLP {info['dims']['intermediate_size']},
untied embeddings) with the course's byte-level BPE tokenizer (vocabulary {info['vocab_size']}),
stored as fp16 safetensors. Built by `knowlm_nb.copybase` from code, plus clauses of the
Chinese sample corpus in `data_samples/corpus` (stages 4-5) and the IE *training*
sentences of `data_samples/ie` (stage 5). A quarter of each batch is random-token spans
repeated 2-4 times (`copybase.repeat_rows`), the rest lines that `copybase.copy_lines` generates
with freshly invented names (English-like, one in four Chinese). In stages 4-5 half of
those lines are Chinese, with clauses of the sample corpus as filler; in stage 5 half of
all lines are instead an IE training sentence followed by its names in order
("... Names mentioned: A, B."; `copybase.mention_lines`), the sentence with fresh names
after its first use and never a name of the held-out evaluation split. So it knows
sentence templates, a little Chinese, and how to **copy a span from its context**, also out
of a real sentence, and no code or facts. It has never seen the NER answer format.

Why it exists: extraction is copying names out of the input. A tiny model only learns
that from a few thousand instructions if its base can already copy (induction heads);
a base that cannot copy learns the answer format and then invents names. Notebook 03
tunes it and reports, stage by stage of this recipe, the exact-match F1 each base reached
on held-out names.

## How it was made
{stages}
- AdamW betas 0.9/0.95, weight decay 0.01, clip 1.0; {info['minutes']} minutes on 2 CPU cores in all
  (0.5-1 s a step with the machine to itself, depending on the machine).
- Induction probe (loss on the second copy of a made-up 8-word span, nats/token):
  {first['probe']:.2f} at step 0, {last['probe']:.2f} at step {last['step']}{crossing}.
  Final training loss {last['loss']:.2f}. The full curve is in `recipe.json`.
- tokenizer sha256 `{info['tokenizer_sha256'][:16]}…`, weights sha256 `{info['weights_sha256'][:16]}…`
  (`knowlm_nb.files.weights_hash`).

`tiny.build_zoo` uses this base when its tokenizer hash and shape match the zoo being
built, else it falls back to a random initialisation and says so in `zoo.json`.

## Rebuild (about {info['minutes']:.0f} minutes on 2 cores; run nothing else meanwhile)

    python -m knowlm_nb.copybase --zoo runs/tiny/00-random --out data_samples/tiny_base

License: CC BY 4.0, like the rest of `data_samples`.
"""



def save_shipped(out: Path, model, tok, info: dict) -> dict:
    """Write ``model`` (as fp16), ``tok`` and ``info`` + weights hash to ``out``, atomically."""
    import torch

    with atomic_dir(out) as tmp:
        copy.deepcopy(model).to(torch.float16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {**info, "weights_sha256": weights_hash(tmp)}
        (tmp / SHIPPED_RECIPE).write_text(json.dumps(info, indent=1), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    return info



# ---------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    from . import config

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.copybase",
                                 description="Rebuild the copy-capable tiny base (the shipped one "
                                             "is data_samples/tiny_base).")
    ap.add_argument("--out", required=True, help="folder for the pretrained base")
    ap.add_argument("--zoo", required=True,
                    help="folder for the zoo (tokenizer and random base) it starts from")
    ap.add_argument("--profile", default="tiny", help="profile whose notebook-00 settings to use")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild the zoo even if cached")
    ap.add_argument("--resume", metavar="DIR", default=None,
                    help="continue a base saved after the recipe's first stages "
                         "(e.g. the shipped one before a stage was added)")
    ap.add_argument("--steps", type=int, default=None,
                    help="copy-pretraining steps, in one stage (default: the shipped recipe's stages)")
    args = ap.parse_args(argv)
    try:
        stages = None
        if args.steps is not None:
            if args.steps < 1:
                raise ZooError(f"--steps must be positive, got {args.steps}")
            stages = [{**COPY_STAGES[0], "steps": args.steps}]
        p = config.notebook_params(args.profile, "00")
        settings = zoo_settings(p) | ({} if args.seed is None else {"seed": args.seed})
        build_zoo(Path(args.zoo), force=args.force, use_shipped=False, **settings)
        info = ship_copy_base(Path(args.out), Path(args.zoo), stages,
                              resume=Path(args.resume) if args.resume else None)
    except (ZooError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
