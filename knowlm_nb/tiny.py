"""The offline model zoo: a byte-level BPE tokenizer and a tiny Llama.

No model hub is reachable here, so the "LLaMA" of this course is built
locally, from ``data_samples``:

* :func:`train_tokenizer` trains a byte-level BPE (the ``tokenizers``
  library) and wraps it as a Hugging Face fast tokenizer with ``<s>``,
  ``</s>``, ``<pad>`` and ``<unk>``. Byte-level means every string, Chinese
  and code included, round-trips exactly.
* :func:`build_model` initialises a ``LlamaForCausalLM`` of a few million
  parameters from a config and a seed.
* :func:`build_zoo` does both, saves them in Hugging Face format
  (``tokenizer.json``, ``model.safetensors``) and caches them: a second call
  with the same recipe returns the saved files.

At real scale the same notebooks take a local checkpoint folder instead.

CLI::

    python -m knowlm_nb.tiny --out runs/tiny/00 [--profile tiny] [--seed 0] [--force]
    python -m knowlm_nb.tiny --out runs/tiny/00-random --pretrain-base data_samples/tiny_base
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import glob as globlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import ROOT

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>",
                  "eos_token": "</s>", "pad_token": "<pad>"}
MANIFEST = "zoo.json"
RECIPE_VERSION = 2  # bump when the build code changes what it produces

DEFAULT_DIMS = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8,
                "intermediate_size": 512, "max_position": 512}
MODEL_KEYS = tuple(DEFAULT_DIMS)


class ZooError(ValueError):
    """Bad input to the zoo builders; the message says what is wrong."""


# ------------------------------------------------------------------ corpus

def corpus_files(pattern: str) -> list[Path]:
    """Files matching ``pattern`` (relative to the repository root), sorted."""
    base = Path(pattern)
    full = str(base if base.is_absolute() else ROOT / base)
    files = sorted(Path(p) for p in globlib.glob(full) if Path(p).is_file())
    if not files:
        raise ZooError(f"no corpus files match {pattern!r}")
    return files


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` for every non-blank line of a JSONL file.

    Invalid UTF-8 or JSON is a :class:`ZooError` naming ``file:line``.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ZooError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ZooError(f"{path}:{lineno}: not JSON ({exc.msg})") from None


def iter_texts(files: Iterable[Path], langs: Iterable[str] | None = None) -> Iterator[str]:
    """The ``text`` field of every JSONL record (optionally only some ``lang``)."""
    keep = set(langs) if langs else None
    for path in files:
        for lineno, rec in iter_jsonl(path):
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ZooError(f"{path}:{lineno}: no string 'text' field")
            if keep is None or rec.get("lang") in keep:
                yield text


def sha256_files(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer; return a ``PreTrainedTokenizerFast``.

    Like LLaMA's tokenizer it prepends ``<s>`` when encoding and knows
    ``</s>`` as end of sequence. Decoding gives back the exact input text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials) + 1:
        raise ZooError(f"vocab_size must be an int >= {256 + len(specials) + 1} "
                       f"(256 bytes + {len(specials)} specials + merges), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ZooError(f"min_frequency must be a positive int, got {min_frequency!r}")
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ZooError("cannot train a tokenizer on an empty corpus")

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 30, **SPECIAL_TOKENS)


def show_tokens(tokenizer, text: str) -> list[str]:
    """The pieces ``text`` is cut into, readable: a token that is only part of
    a UTF-8 character is shown as its bytes, e.g. ``<e5 b1>``."""
    pieces = []
    for tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece = tokenizer.decode([tid])
        if "\ufffd" in piece:
            token = tokenizer.convert_ids_to_tokens(tid)
            piece = "<" + " ".join(f"{b:02x}" for b in _byte_level_bytes(token)) + ">"
        pieces.append(piece)
    return pieces


def _byte_level_bytes(token: str) -> bytes:
    """The raw bytes behind a byte-level BPE token string (GPT-2's byte map)."""
    table = _byte_decoder()
    return bytes(table[ch] for ch in token)


@functools.cache  # built once: _byte_level_bytes runs for every token of a vocabulary
def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable character map used by ByteLevel
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokens_per_char(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per character over ``texts`` (no special tokens counted)."""
    texts = [t for t in texts if t]
    if not texts:
        raise ZooError("tokens_per_char needs at least one non-empty text")
    n_tok = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return n_tok / sum(len(t) for t in texts)


# -------------------------------------------------------------------- model

def model_config(tokenizer, hidden_size=256, num_layers=4, num_heads=8,
                 num_kv_heads=8, intermediate_size=512, max_position=512):
    """A ``LlamaConfig`` for a tiny Llama matching ``tokenizer``."""
    from transformers import LlamaConfig

    dims = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                max_position=max_position)
    for key, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ZooError(f"{key} must be a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ZooError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ZooError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    if (hidden_size // num_heads) % 2:
        raise ZooError("hidden_size / num_heads must be even (rotary embeddings)")
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_model(config, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM``; same seed, same weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_breakdown(model) -> dict[str, int]:
    """Parameters by part: embeddings, attention, MLP, norms, LM head."""
    parts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            key = "embeddings"
        elif "self_attn" in name:
            key = "attention"
        elif ".mlp." in name:
            key = "mlp"
        elif "lm_head" in name:
            key = "lm_head"
        else:
            key = "norms"
        parts[key] += p.numel()
    return parts


def mean_loss(model, tokenizer, texts: Iterable[str], max_len: int = 128) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``texts``."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_len,
                            return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    if not count:
        raise ZooError("mean_loss needs texts of at least two tokens")
    return total / count


def weights_hash(model_dir: Path) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in a model folder."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ZooError(f"no .safetensors files in {model_dir}")
    h = hashlib.sha256()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in sorted(fh.keys()):
                t = fh.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------- a base that can copy

# Extraction is copying: the answer's names are spans of the input. A tiny
# model only learns to extract names it has never seen if its base can
# already copy from its context (induction heads). The text below teaches
# that: every name slot gets a freshly invented name, so nothing can be
# memorised and the only way to predict a name's second mention is to copy
# its first one. Measured recipe: ../shared/notes/tiny-ie-recipe.md.

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu",
           "r", "s", "st", "t", "tr", "v", "w", "z", "sh", "th", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "t", "m", "nd", "rk", "ll", "x"]
_ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
_ZH_GIVEN = list("伟芳娜敏静丽强磊军洋勇艳杰涛明超秀霞平刚桂英华玉萍红娥玲芬燕彬鹏辉斌宇浩凯健俊帆帅旭宁龙林欣晨阳佳瑶琪琳晓梦雪婷颖慧倩雅丹薇文博志远思嘉瀚昊睿泽轩航晗煜一诺子涵梓萱雨若曦可馨")
_ZH_PLACE_TAIL = ["市", "县", "镇", "港", "湾", "山", "岛", "村"]
_ZH_ORG_TAIL = ["科技", "集团", "研究院", "大学", "银行", "航空", "智能", "实验室", "有限公司", "基金会"]
_ORG_TAIL = ["Systems", "Labs", "Group", "Institute", "Bank", "Foundation", "Works",
             "Partners", "Aerial", "Robotics", "University", "Holdings"]
_PLACE_HEAD = ["Port", "Lake", "Mount", "New", "East", "West", "Fort", "Saint"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
# a time's parts that time_like swaps for others of their kind: numbers, English
# month, weekday and season words, Chinese weekdays (周六) and seasons (2025年春)
_TIME_WORDS = {w.lower(): group for group in (_MONTHS, _WEEKDAYS, _SEASONS) for w in group}
_TIME_PART = re.compile(r"(?P<number>\d+)|(?P<word>[A-Za-z]+)|(?P<zh_weekday>周[一二三四五六日天])"
                        r"|(?P<zh_season>[春夏秋冬](?=季|天|$))|.", re.S)
_FILLER = ("the a an of in on at to from with and but or so then later after before "
           "during while because every some many few old new big small red blue green "
           "quiet loud early late happy busy river garden market station window "
           "letter story music paper bridge winter summer morning evening city "
           "village road house table book friend family teacher doctor farmer "
           "walks reads writes sings moves opens closes finds keeps sends builds "
           "visits meets sees hears likes wants needs gives takes makes").split()


class NameMaker:
    """Invents fresh names, places, organisations, times and products.

    ``NameMaker(seed).make("person", "en")`` -> ``"Vorin Stallek"``;
    ``make("person", "zh")`` -> ``"林晓峰"``-like names. Hundreds of
    thousands of distinct strings, so a model cannot memorise them.
    """

    KINDS = ("person", "location", "organization", "time", "product")

    def __init__(self, seed: int = 0):
        import random

        self.rng = random.Random(seed)

    def word(self, syllables: int | None = None) -> str:
        r = self.rng
        n = syllables or r.choice([2, 2, 2, 3])
        return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(n - 1)) + (
            r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS))

    def make(self, kind: str, lang: str = "en") -> str:
        r = self.rng
        if kind not in self.KINDS:
            raise ZooError(f"unknown name kind {kind!r}; valid: {list(self.KINDS)}")
        if lang == "zh":
            given = "".join(r.choice(_ZH_GIVEN) for _ in range(r.choice([1, 2, 2])))
            if kind == "person":
                return r.choice(_ZH_SURNAMES) + given
            if kind == "location":
                return given + r.choice(_ZH_PLACE_TAIL)
            if kind == "organization":
                return r.choice(_ZH_SURNAMES) + given + r.choice(_ZH_ORG_TAIL)
            if kind == "time":
                return f"{r.randint(1950, 2030)}年{r.randint(1, 12)}月"
            return given + r.choice("XYZ") + str(r.randint(2, 99))
        if kind == "person":
            return f"{self.word().title()} {self.word().title()}"
        if kind == "location":
            name = self.word().title()
            return f"{r.choice(_PLACE_HEAD)} {name}" if r.random() < 0.4 else name
        if kind == "organization":
            return f"{self.word().title()} {r.choice(_ORG_TAIL)}"
        if kind == "time":
            if r.random() < 0.5:
                return f"{r.choice(_MONTHS)} {r.randint(1950, 2030)}"
            return f"{r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1950, 2030)}"
        return f"{self.word().title()} {r.choice(['X', 'Pro', 'One', 'Mini', str(r.randint(2, 99))])}"

    def time_like(self, old: str) -> str:
        """A fresh time of the same shape as ``old``, in either language.

        ``"Tuesday"`` -> another weekday, ``"2021"`` -> another year,
        ``"14 July 2022"`` -> another day, month and year, ``"2023年4月12日"``
        -> another date written the same way, ``"周六"`` -> ``"周二"``-like,
        ``"2025年春"`` -> another year and season. Words that are not such
        parts (``"mid-"``, ``"evening"``, ``"下月初"``) are kept. Real
        sentences name times in many shapes; :meth:`make` has one per language.
        """
        r, out = self.rng, []
        for m in _TIME_PART.finditer(old):
            part, kind, after = m.group(), m.lastgroup, old[m.end():m.end() + 1]
            if kind == "number":
                if len(part) == 4:  # a year: keep the century's side of 1950
                    part = str(r.randint(1950, 2030) if int(part) >= 1950 else r.randint(1800, 1949))
                elif after == "月":
                    part = str(r.randint(1, 12))
                elif after in ("日", "号", " ", "") and int(part) <= 31:
                    part = str(r.randint(1, 28))
            elif kind == "word" and part.lower() in _TIME_WORDS:
                new = r.choice(_TIME_WORDS[part.lower()])
                part = new if part[0].isupper() else new.lower()
            elif kind == "zh_weekday":
                part = "周" + r.choice("一二三四五六日")
            elif kind == "zh_season":
                part = r.choice("春夏秋冬")
            out.append(part)
        return "".join(out)

    def any(self, lang: str | None = None) -> str:
        lang = lang or self.rng.choice(["en", "en", "en", "zh"])
        return self.make(self.rng.choice(self.KINDS), lang)


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
    shipped base uses :func:`knowlm_nb.instruct.mention_lines`).
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
    training sentences (:func:`knowlm_nb.instruct.mention_lines`).
    """
    import random

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
        from .instruct import mention_lines  # stage 03's module: imported only when asked for

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


# The copy-capable base is built once (about 10 minutes on 2 cores) and
# shipped in data_samples/tiny_base as fp16 safetensors with its recipe, its
# training history and a model card. build_zoo uses it whenever its recipe
# (tokenizer bytes and model shape) matches; otherwise the base is a random
# initialisation, and the zoo says so.
SHIPPED_BASE = ROOT / "data_samples" / "tiny_base"
SHIPPED_RECIPE = "recipe.json"
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


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_base(tokenizer_sha256: str, dims: dict, where: Path = SHIPPED_BASE) -> Path | None:
    """The shipped base folder if it was trained with this tokenizer and shape."""
    path = Path(where) / SHIPPED_RECIPE
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    same = info.get("tokenizer_sha256") == tokenizer_sha256 and all(
        info.get("dims", {}).get(k) == dims[k] for k in MODEL_KEYS)
    return Path(where) if same else None


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
    tok_sha = _file_sha256(zoo_dir / "tokenizer" / "tokenizer.json")
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
stored as fp16 safetensors. Built by `knowlm_nb.tiny` from code, plus clauses of the
Chinese sample corpus in `data_samples/corpus` (stages 4-5) and the IE *training*
sentences of `data_samples/ie` (stage 5). A quarter of each batch is random-token spans
repeated 2-4 times (`tiny.repeat_rows`), the rest lines that `tiny.copy_lines` generates
with freshly invented names (English-like, one in four Chinese). In stages 4-5 half of
those lines are Chinese, with clauses of the sample corpus as filler; in stage 5 half of
all lines are instead an IE training sentence followed by its names in order
("... Names mentioned: A, B."; `instruct.mention_lines`), the sentence with fresh names
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
  (`knowlm_nb.tiny.weights_hash`).

`tiny.build_zoo` uses this base when its tokenizer hash and shape match the zoo being
built, else it falls back to a random initialisation and says so in `zoo.json`.

## Rebuild (about {info['minutes']:.0f} minutes on 2 cores; run nothing else meanwhile)

    python -m knowlm_nb.tiny --out runs/tiny/00-random --pretrain-base data_samples/tiny_base

License: CC BY 4.0, like the rest of `data_samples`.
"""


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a scratch folder beside ``out``; on success it replaces ``out`` whole.

    On any error the scratch folder is removed and ``out`` is left as it was,
    so a reader never sees a half-written folder.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# ---------------------------------------------------------------------- zoo

@dataclass
class Zoo:
    root: Path
    manifest: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def model_dir(self) -> Path:
        return self.root / "base"

    def load(self):
        """``(tokenizer, model)`` loaded from the saved files."""
        from transformers import AutoTokenizer, LlamaForCausalLM

        from . import preflight  # a wrong local path: the project's 'not found'
        tok = AutoTokenizer.from_pretrained(
            preflight.require(self.tokenizer_dir, "tokenizer"), local_files_only=True)
        model = LlamaForCausalLM.from_pretrained(
            preflight.require(self.model_dir, "model"), local_files_only=True)
        model.eval()
        return tok, model


def recipe(corpus_glob: str, seed: int, vocab_size: int, min_frequency: int,
           **dims) -> dict:
    files = corpus_files(corpus_glob)
    return {"recipe_version": RECIPE_VERSION, "corpus_glob": corpus_glob,
            "corpus_sha256": sha256_files(files), "seed": seed, "vocab_size": vocab_size,
            "min_frequency": min_frequency, **{k: dims[k] for k in MODEL_KEYS}}


ZOO_KEYS = ("corpus_glob", "seed", "vocab_size", "min_frequency", *MODEL_KEYS)


def zoo_settings(params: dict) -> dict:
    """:func:`build_zoo`'s settings out of notebook 00's parameters (a profile's or a run's)."""
    return {k: params[k] for k in ZOO_KEYS}


def build_zoo(out: Path, corpus_glob: str = "data_samples/corpus/*.jsonl", seed: int = 0,
              vocab_size: int = 2000, min_frequency: int = 2, force: bool = False,
              verbose: bool = True, use_shipped: bool = True, **dims) -> Zoo:
    """Build (or reuse) the tokenizer and tiny base in ``out``.

    ``out/tokenizer`` and ``out/base`` are written into a temporary folder and
    moved into place only when both are complete, so an interrupted build
    leaves nothing half-written. ``out/zoo.json`` records the recipe; a later
    call with the same recipe reuses the files.

    The base is the shipped copy-pretrained model (:data:`SHIPPED_BASE`) when
    it was trained with exactly this tokenizer and shape and ``use_shipped``;
    otherwise a random initialisation from ``seed``. ``zoo.json`` says which.
    """
    unknown = set(dims) - set(MODEL_KEYS)
    if unknown:
        raise ZooError(f"unknown model setting(s) {sorted(unknown)}; valid: {list(MODEL_KEYS)}")
    dims = {**DEFAULT_DIMS, **dims}
    out = Path(out)
    shipped_info = SHIPPED_BASE / SHIPPED_RECIPE
    want = dict(recipe(corpus_glob, seed, vocab_size, min_frequency, **dims),
                shipped_base=_file_sha256(shipped_info) if use_shipped and shipped_info.is_file()
                else None)
    manifest_path = out / MANIFEST
    if not force and manifest_path.is_file():
        have = json.loads(manifest_path.read_text(encoding="utf-8"))
        if have.get("recipe") == want and (out / "base").is_dir() and (out / "tokenizer").is_dir():
            if verbose:
                print(f"reusing the cached zoo in {out} (same recipe)")
            return Zoo(out, have)

    files = corpus_files(corpus_glob)
    if verbose:
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(files)} files")
    tokenizer = train_tokenizer(iter_texts(files), vocab_size, min_frequency)
    config = model_config(tokenizer, **dims)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        shipped = shipped_base(_file_sha256(tmp / "tokenizer" / "tokenizer.json"), dims) \
            if use_shipped else None
        if shipped:
            import torch
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(shipped, dtype=torch.float32, local_files_only=True)
            model.eval()
            kind = "copy-pretrained (shipped)"
        else:
            model = build_model(config, seed)
            kind = "random init"
        model.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")  # a model folder that loads on its own
        manifest = {
            "recipe": want,
            "base": kind,
            "parameters": count_parameters(model),
            "vocab_size": len(tokenizer),
            "tokenizer_sha256": hashlib.sha256(
                (tmp / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest(),
            "weights_sha256": weights_hash(tmp / "base"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        manifest_path.unlink(missing_ok=True)  # invalid from here until the swap ends
        for name in ("tokenizer", "base"):
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(tmp / name, out / name)
        os.replace(tmp / MANIFEST, manifest_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"saved tokenizer and a {manifest['parameters']:,}-parameter Llama ({kind}) to {out}")
    return Zoo(out, manifest)


def sample(model, tokenizer, prompt: str, max_new_tokens: int = 40, seed: int = 0,
           temperature: float = 1.0, top_p: float = 0.95) -> str:
    """Sample a continuation of ``prompt`` (sampling really on: ``do_sample=True``)."""
    import torch

    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_p=top_p,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    from . import config

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.tiny",
                                 description="Build the offline tokenizer and tiny Llama.")
    ap.add_argument("--out", required=True, help="output folder (tokenizer/, base/, zoo.json)")
    ap.add_argument("--profile", default="tiny", help="profile whose notebook-00 settings to use")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--pretrain-base", metavar="DIR",
                    help="also pretrain the copy-capable base (~25 min on 2 cores) and save it "
                         f"to DIR (the shipped one is {SHIPPED_BASE.relative_to(ROOT)})")
    ap.add_argument("--resume", metavar="DIR", default=None,
                    help="with --pretrain-base: continue a base saved after the recipe's first "
                         "stages (e.g. the shipped one before a stage was added)")
    ap.add_argument("--steps", type=int, default=None,
                    help="copy-pretraining steps for --pretrain-base, in one stage "
                         "(default: the shipped recipe's stages)")
    args = ap.parse_args(argv)
    try:
        p = config.notebook_params(args.profile, "00")
        settings = zoo_settings(p) | ({} if args.seed is None else {"seed": args.seed})
        zoo = build_zoo(Path(args.out), force=args.force, use_shipped=not args.pretrain_base,
                        **settings)
        if args.pretrain_base:
            stages = None
            if args.steps is not None:
                if args.steps < 1:
                    raise ZooError(f"--steps must be positive, got {args.steps}")
                stages = [{**COPY_STAGES[0], "steps": args.steps}]
            info = ship_copy_base(Path(args.pretrain_base), Path(args.out), stages,
                                  resume=Path(args.resume) if args.resume else None)
            print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))
            return 0
    except (ZooError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(zoo.manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
