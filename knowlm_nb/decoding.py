"""Decoding shared by stages 03-06: batched greedy / beam generation and the copy-constrained NER grammar.

* :func:`generate` - batched greedy (or beam-search) decoding with left
  padding, an attention mask, a token cap and a cut at the first EOS.
* :class:`NerGrammar` / :func:`ner_copy_constraint` - decoding that may only
  write type labels and spans of the input that cut no word (with
  ``num_beams``, beam search); :func:`copy_errors` counts the names of an
  answer that break those rules.
* :func:`vocabulary_bytes` - the bytes each token stands for, for byte-level
  BPE (GPT-2, the tiny zoo: :func:`byte_level_bytes`) and SentencePiece
  (LLaMA) tokenizers.

It imports no stage module, so inference and the widgets use it without the
training code.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable

from . import ie


class DecodingError(ValueError):
    """Bad input to decoding; the message says what is wrong."""


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
        raise DecodingError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if num_beams < 1:
        raise DecodingError(f"num_beams must be positive, got {num_beams}")
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


class NerGrammar:
    """Byte-level automaton of an NER answer whose entities are copied from the input.

    ``(label, span), (label, span)`` or the NONE word: a label is one of
    ``labels``, a span is a non-empty run of the input's bytes without
    parentheses that starts and ends on a whole character and does not cut
    a word (a run of letters and digits other than CJK ones, which have no
    word breaks), and no (label, span) pair comes twice. A state is a tuple;
    :meth:`feed` returns the state after some bytes, or None if they leave
    the grammar.
    """

    def __init__(self, source: str, labels: Iterable[str], none_word: str):
        self.source = source.encode("utf-8")
        self.heads = [f"{x}, ".encode("utf-8") for x in labels]
        self.none = none_word.encode("utf-8")
        # byte offsets where a span may start or end: between two characters that
        # are not both inside one word ("Philhar|monic" is no place to stop)
        offsets = [0]
        for ch in source:
            offsets.append(offsets[-1] + len(ch.encode("utf-8")))
        cuts = [k for k in range(1, len(source))
                if _word_character(source[k - 1]) and _word_character(source[k])]
        self.bounds = set(offsets) - {offsets[k] for k in cuts}
        # the bytes a span may start with: the first byte after a boundary, no parenthesis
        self.span_starts = {self.source[i] for i in self.bounds if i < len(self.source)} - {
            ord("("), ord(")")}

    START = ("start", b"", b"", frozenset())

    @classmethod
    def for_example(cls, example: dict) -> "NerGrammar":
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
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in repr(backend.decoder):
        return byte_level_bytes
    return _sentencepiece_bytes


def vocabulary_bytes(tokenizer) -> dict[int, bytes]:
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


def _viable_tokens(grammar: NerGrammar, state, node, out: list[int]) -> list[int]:
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
    table = vocabulary_bytes(tokenizer)
    grammars = [NerGrammar.for_example(ex) for ex in examples]
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
        grammar = NerGrammar.for_example(ex)
        for _, name in ie.parse_ner(out)[0]:
            counts["pairs"] += 1
            if name not in ex["input"]:
                counts["not_in_text"] += 1
            elif not grammar._occurs(name.encode("utf-8"), whole=True):
                counts["cut_words"] += 1
    return counts


# ------------------------------------------------------------- token bytes

def byte_level_bytes(token: str) -> bytes:
    """The raw bytes behind a byte-level BPE token string (GPT-2's byte map)."""
    table = _byte_decoder()
    return bytes(table[ch] for ch in token)


@functools.cache  # built once: byte_level_bytes runs for every token of a vocabulary
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
