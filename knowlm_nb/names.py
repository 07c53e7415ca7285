"""Synthetic names: every fresh-name generator of the course, its word lists, and fresh-name copies.

Extraction is copying names out of the input, so the course keeps inventing
names a model cannot have memorised:

* :class:`NameMaker` makes names of random syllables (``"Vorin Stallek"``,
  ``"林晓峰"``-like) for each entity kind, and :meth:`NameMaker.time_like`
  a fresh time of the same shape as a given one. The copy-pretraining of the
  shipped base (:mod:`knowlm_nb.copybase`) uses it.
* :class:`WordNames` makes realistic-looking names out of ordinary words and
  morphemes (``"Stanhope Media"``, ``"远航科技"``), keeping out every piece
  only the held-out names contain; stage 03's tuning data uses it.
* :func:`name_maker` picks one by style (:data:`NAME_STYLES`);
  :func:`fresh_records` yields the IE training records forever, once as
  written and then with fresh names (:func:`knowlm_nb.ie.substitute_names`).
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import ROOT, ie
from .files import iter_jsonl


class NamesError(ValueError):
    """Bad input to a name generator; the message says what is wrong."""


def subset(words: list[str], picked: str) -> list[str]:
    """The space-separated ``picked`` words, each checked to be one of ``words`` (order kept)."""
    out = picked.split()
    missing = [w for w in out if w not in words]
    if missing:
        raise NamesError(f"{missing} are not in the word list")
    return out


# ------------------------------------------------------------ word lists

# syllables of NameMaker's invented words
ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu",
          "r", "s", "st", "t", "tr", "v", "w", "z", "sh", "th", "ch"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
CODAS = ["", "", "", "n", "r", "l", "s", "t", "m", "nd", "rk", "ll", "x"]

# English name parts; NameMaker uses the shorter lists, in the order the shipped base saw them
PLACE_HEADS = ["Port", "Lake", "Mount", "New", "North", "South", "East", "West", "Upper",
               "Lower", "Old", "Saint", "Fort", "Glen"]
SYLLABLE_PLACE_HEADS = subset(PLACE_HEADS, "Port Lake Mount New East West Fort Saint")
PLACE_TAILS = ["Ridge", "Cove", "Point", "Hills", "Vale", "Valley", "Lane", "Wells", "Bay",
               "Harbour", "Mountains", "Falls", "Island", "Heights", "Crossing", "Springs"]
_ORG_TAILS_BOTH = ["Systems", "Labs", "Group", "Institute", "Bank", "Foundation", "Works",
                   "Partners"]
SYLLABLE_ORG_TAILS = _ORG_TAILS_BOTH + ["Aerial", "Robotics", "University", "Holdings"]
ORG_TAILS = _ORG_TAILS_BOTH + [
    "Holdings", "Media", "Trust", "Dairy", "Library", "Guild", "Homes", "Marine", "Market",
    "Museum", "Project", "Line", "School", "Council", "Press", "Studio", "Mills", "Energy",
    "Hospital", "Club", "Orchestra", "Ironworks", "Aggregates", "Station", "Society",
    "Academy", "Airways", "Motors"]
PRODUCT_TAILS = ["Pro", "One", "Mini", "Max", "Air", "Go", "Plus", "Lite"]
EN_SUFFIXES = ["ton", "ford", "ley", "wick", "field", "well", "gate", "worth", "more", "by",
               "dale", "brook", "stead", "hope", "wood", "mere", "holt", "bury", "ridge",
               "haven", "shaw", "combe", "ham", "stone", "low", "moor"]

# Chinese name parts
ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
ZH_GIVEN = list("伟芳娜敏静丽强磊军洋勇艳杰涛明超秀霞平刚桂英华玉萍红娥玲芬燕彬鹏辉斌宇浩凯健俊帆帅旭宁龙林欣晨阳佳瑶琪琳晓梦雪婷颖慧倩雅丹薇文博志远思嘉瀚昊睿泽轩航晗煜一诺子涵梓萱雨若曦可馨")
ZH_CHARS_EXTRA = list("澜溪岭漠源川峰岳磐坤鑫凌翼航沐舒脉宁苍梧桐槐桦枫柳梅松竹兰荷岚霞雾云星辰"
                      "光影青蓝金银铜铁石玉河湖海港湾泉渊崖谷原野丘林森禾麦稻茗墨砚鸢鹭鹤雁")
SYLLABLE_ZH_PLACE_TAILS = ["市", "县", "镇", "港", "湾", "山", "岛", "村"]
ZH_PLACE_TAILS = SYLLABLE_ZH_PLACE_TAILS + ["区", "省", "河", "湖", "路", "关", "山脉", "街"]
ZH_INDUSTRIES = ["科技", "智能", "医药", "化工", "物流", "咖啡", "茶业", "控股", "建材", "游戏",
                 "银行", "出版社", "家居", "设计", "置业", "建筑", "车队", "食品", "电子", "能源",
                 "传媒", "航空", "集团", "研究院", "基金会", "实验室", "有限公司", "大学"]
SYLLABLE_ZH_ORG_TAILS = subset(ZH_INDUSTRIES, "科技 集团 研究院 大学 银行 航空 智能 实验室 有限公司 基金会")

# times
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]
# a time's parts that time_like swaps for others of their kind: numbers, English
# month, weekday and season words, Chinese weekdays (周六) and seasons (2025年春)
_TIME_WORDS = {w.lower(): group for group in (MONTHS, WEEKDAYS, SEASONS) for w in group}
_TIME_PART = re.compile(r"(?P<number>\d+)|(?P<word>[A-Za-z]+)|(?P<zh_weekday>周[一二三四五六日天])"
                        r"|(?P<zh_season>[春夏秋冬](?=季|天|$))|.", re.S)


# ------------------------------------------------------- random syllables

class NameMaker:
    """Invents fresh names, places, organisations, times and products.

    ``NameMaker(seed).make("person", "en")`` -> ``"Vorin Stallek"``;
    ``make("person", "zh")`` -> ``"林晓峰"``-like names. Hundreds of
    thousands of distinct strings, so a model cannot memorise them.
    """

    KINDS = ("person", "location", "organization", "time", "product")

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def word(self, syllables: int | None = None) -> str:
        r = self.rng
        n = syllables or r.choice([2, 2, 2, 3])
        return "".join(r.choice(ONSETS) + r.choice(VOWELS) for _ in range(n - 1)) + (
            r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS))

    def make(self, kind: str, lang: str = "en") -> str:
        r = self.rng
        if kind not in self.KINDS:
            raise NamesError(f"unknown name kind {kind!r}; valid: {list(self.KINDS)}")
        if lang == "zh":
            given = "".join(r.choice(ZH_GIVEN) for _ in range(r.choice([1, 2, 2])))
            if kind == "person":
                return r.choice(ZH_SURNAMES) + given
            if kind == "location":
                return given + r.choice(SYLLABLE_ZH_PLACE_TAILS)
            if kind == "organization":
                return r.choice(ZH_SURNAMES) + given + r.choice(SYLLABLE_ZH_ORG_TAILS)
            if kind == "time":
                return f"{r.randint(1950, 2030)}年{r.randint(1, 12)}月"
            return given + r.choice("XYZ") + str(r.randint(2, 99))
        if kind == "person":
            return f"{self.word().title()} {self.word().title()}"
        if kind == "location":
            name = self.word().title()
            return f"{r.choice(SYLLABLE_PLACE_HEADS)} {name}" if r.random() < 0.4 else name
        if kind == "organization":
            return f"{self.word().title()} {r.choice(SYLLABLE_ORG_TAILS)}"
        if kind == "time":
            if r.random() < 0.5:
                return f"{r.choice(MONTHS)} {r.randint(1950, 2030)}"
            return f"{r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1950, 2030)}"
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


# ----------------------------------------------------------- ordinary words

# Real names are ordinary words and morphemes put together ("Stanhope Media",
# "Port Elsin", "远航科技"), while names of random syllables ("Moweshex Sawym")
# all have one odd shape; a model tuned on those learns that shape as "a name".
# WordNames keeps out every piece that only the held-out names contain
# (see name_maker).

class WordNames(NameMaker):
    """Fresh names built from ordinary words and morphemes, not random syllables.

    ``words`` are lowercase English words (the sample corpus's) to build
    from; ``banned_words`` never appear in an English name (use the words
    that only the evaluation split's names contain). Given ``zh_seen`` (text
    the model may see: the Chinese corpus and training sentences), a Chinese
    character or name ending is used only if it occurs in it. ``make`` has
    the signature of :meth:`NameMaker.make`, so
    :func:`knowlm_nb.ie.substitute_names` takes either.
    """

    def __init__(self, seed: int = 0, words: Iterable[str] = (), banned_words: Iterable[str] = (),
                 zh_seen: str | None = None):
        super().__init__(seed)
        banned = {w.lower() for w in banned_words}
        self.words = sorted({w for w in words if w.isalpha() and w.isascii() and 3 <= len(w) <= 8
                             and w.lower() not in banned})
        if len(self.words) < 50:
            raise NamesError(f"WordNames needs at least 50 usable words, got {len(self.words)}")
        self.banned = banned

        def allowed(pieces):
            return [x for x in pieces if not set(x.lower().split()) & banned]

        self.heads, self.place_tails = allowed(PLACE_HEADS), allowed(PLACE_TAILS)
        self.org_tails, self.product_tails = allowed(ORG_TAILS), allowed(PRODUCT_TAILS)
        self.suffixes = EN_SUFFIXES

        def seen(pieces):
            return list(pieces) if zh_seen is None else [x for x in pieces if x in zh_seen]

        self.zh_chars, self.zh_surnames = seen(dict.fromkeys(ZH_GIVEN + ZH_CHARS_EXTRA)), seen(ZH_SURNAMES)
        self.zh_industry, self.zh_place_tails = seen(ZH_INDUSTRIES), seen(ZH_PLACE_TAILS)

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
    raise NamesError(f"unknown name style {style!r}; valid: {list(NAME_STYLES)}")


# ------------------------------------------------------- fresh-name copies

def fresh_records(lang: str, seed: int, data: Path = ROOT / "data_samples", style: str = "words",
                  rename: Callable[[dict, NameMaker], dict] = ie.substitute_names) -> Iterator[dict]:
    """The IE training records of ``lang`` forever: once as written, then with fresh names.

    Each pass shuffles them. After the first pass every record is renamed by
    ``rename(record, maker)`` (:func:`knowlm_nb.ie.substitute_names`) with
    names of ``style`` (:func:`name_maker`); a copy whose text contains a
    name of the evaluation split, even inside a longer invented name, is
    drawn again (up to five times).
    """
    train, evaluation = ie.split_records(lang, data)
    banned = set().union(*(ie.names_of(r) for r in evaluation))
    maker, rng = name_maker(style, seed + (1 if lang == "zh" else 0), data), random.Random(seed)
    order, first_pass = list(train), True
    while True:
        rng.shuffle(order)
        for rec in order:
            if not first_pass:
                for _ in range(5):
                    new = rename(rec, maker)
                    if not any(name in new["text"] for name in banned):
                        rec = new
                        break
            yield rec
        first_pass = False
