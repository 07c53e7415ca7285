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
"""
from __future__ import annotations

import argparse
import glob as globlib
import hashlib
import json
import os
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
RECIPE_VERSION = 1  # bump when the build code changes what it produces

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

        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        model = LlamaForCausalLM.from_pretrained(self.model_dir)
        model.eval()
        return tok, model


def recipe(corpus_glob: str, seed: int, vocab_size: int, min_frequency: int,
           **dims) -> dict:
    files = corpus_files(corpus_glob)
    return {"recipe_version": RECIPE_VERSION, "corpus_glob": corpus_glob,
            "corpus_sha256": sha256_files(files), "seed": seed, "vocab_size": vocab_size,
            "min_frequency": min_frequency, **{k: dims[k] for k in MODEL_KEYS}}


def build_zoo(out: Path, corpus_glob: str = "data_samples/corpus/*.jsonl", seed: int = 0,
              vocab_size: int = 2000, min_frequency: int = 2, force: bool = False,
              verbose: bool = True, **dims) -> Zoo:
    """Build (or reuse) the tokenizer and tiny base in ``out``.

    ``out/tokenizer`` and ``out/base`` are written into a temporary folder and
    moved into place only when both are complete, so an interrupted build
    leaves nothing half-written. ``out/zoo.json`` records the recipe; a later
    call with the same recipe reuses the files.
    """
    unknown = set(dims) - set(MODEL_KEYS)
    if unknown:
        raise ZooError(f"unknown model setting(s) {sorted(unknown)}; valid: {list(MODEL_KEYS)}")
    dims = {**DEFAULT_DIMS, **dims}
    out = Path(out)
    want = recipe(corpus_glob, seed, vocab_size, min_frequency, **dims)
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
    model = build_model(config, seed)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        model.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")  # a model folder that loads on its own
        manifest = {
            "recipe": want,
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
        print(f"saved tokenizer and a {manifest['parameters']:,}-parameter Llama to {out}")
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
    args = ap.parse_args(argv)
    try:
        p = config.notebook_params(args.profile, "00")
        zoo = build_zoo(Path(args.out), corpus_glob=p["corpus_glob"],
                        seed=p["seed"] if args.seed is None else args.seed,
                        vocab_size=p["vocab_size"], min_frequency=p["min_frequency"],
                        force=args.force, **{k: p[k] for k in MODEL_KEYS})
    except (ZooError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(zoo.manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
