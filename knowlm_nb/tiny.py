"""Stage 00's model zoo: a byte-level BPE tokenizer, a tiny Llama, sampling, and the shipped base.

No model hub is reachable here, so the "LLaMA" of this course is built
locally, from ``data_samples``:

* :func:`train_tokenizer` trains a byte-level BPE (the ``tokenizers``
  library) and wraps it as a Hugging Face fast tokenizer with ``<s>``,
  ``</s>``, ``<pad>`` and ``<unk>``. Byte-level means every string, Chinese
  and code included, round-trips exactly.
* :func:`build_model` initialises a ``LlamaForCausalLM`` of a few million
  parameters from a config and a seed; :func:`sample` continues a prompt.
* :func:`build_zoo` does both, saves them in Hugging Face format
  (``tokenizer.json``, ``model.safetensors``) and caches them: a second call
  with the same recipe returns the saved files. Its base is the shipped
  copy-pretrained one (:data:`SHIPPED_BASE`, built by
  :mod:`knowlm_nb.copybase`) whenever tokenizer and shape match.

At real scale the same notebooks take a local checkpoint folder instead.

CLI::

    python -m knowlm_nb.tiny --out runs/tiny/00 [--profile tiny] [--seed 0] [--force]
    python -m knowlm_nb.tiny --out runs/tiny/00-random --pretrain-base data_samples/tiny_base
        (an alias of ``python -m knowlm_nb.copybase --zoo ... --out ...``)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import ROOT
from .decoding import byte_level_bytes
from .files import FilesError, atomic_dir, find_files, iter_jsonl, sha256_file, sha256_files, \
    weights_hash, write_json

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
            piece = "<" + " ".join(f"{b:02x}" for b in byte_level_bytes(token)) + ">"
        pieces.append(piece)
    return pieces


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
    device = next(model.parameters()).device  # a quantized or GPU-placed model too
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_len,
                            return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    if not count:
        raise ZooError("mean_loss needs texts of at least two tokens")
    return total / count


# The copy-capable base is built once by knowlm_nb.copybase (114 min on
# 2 cores) and shipped in data_samples/tiny_base as fp16 safetensors with its recipe, its
# training history and a model card. build_zoo uses it whenever its recipe
# (tokenizer bytes and model shape) matches; otherwise the base is a random
# initialisation, and the zoo says so.
SHIPPED_BASE = ROOT / "data_samples" / "tiny_base"
SHIPPED_RECIPE = "recipe.json"


def shipped_base(tokenizer_sha256: str, dims: dict, where: Path = SHIPPED_BASE) -> Path | None:
    """The shipped base folder if it was trained with this tokenizer and shape."""
    path = Path(where) / SHIPPED_RECIPE
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    same = info.get("tokenizer_sha256") == tokenizer_sha256 and all(
        info.get("dims", {}).get(k) == dims[k] for k in MODEL_KEYS)
    return Path(where) if same else None


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
    files = find_files(corpus_glob)
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

    ``out/tokenizer`` and ``out/base`` are each written into a scratch folder
    and moved into place whole (:func:`knowlm_nb.files.atomic_dir`), and
    ``out/zoo.json``, which records the recipe, is removed first and written
    last: an interrupted build leaves nothing half-written and no manifest, so
    the next call rebuilds. A later call with the same recipe reuses the files.

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
                shipped_base=sha256_file(shipped_info) if use_shipped and shipped_info.is_file()
                else None)
    manifest_path = out / MANIFEST
    if not force and manifest_path.is_file():
        have = json.loads(manifest_path.read_text(encoding="utf-8"))
        if have.get("recipe") == want and (out / "base").is_dir() and (out / "tokenizer").is_dir():
            if verbose:
                print(f"reusing the cached zoo in {out} (same recipe)")
            return Zoo(out, have)

    files = find_files(corpus_glob)
    if verbose:
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(files)} files")
    tokenizer = train_tokenizer(iter_texts(files), vocab_size, min_frequency)
    config = model_config(tokenizer, **dims)
    manifest_path.unlink(missing_ok=True)  # invalid from here until both folders are in place
    with atomic_dir(out / "tokenizer") as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        tokenizer_sha256 = sha256_file(tok_dir / "tokenizer.json")
    shipped = shipped_base(tokenizer_sha256, dims) if use_shipped else None
    if shipped:
        import torch
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(shipped, dtype=torch.float32, local_files_only=True)
        model.eval()
        kind = "copy-pretrained (shipped)"
    else:
        model = build_model(config, seed)
        kind = "random init"
    with atomic_dir(out / "base") as base_dir:
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)  # a model folder that loads on its own
        weights_sha256 = weights_hash(base_dir)
    manifest = {"recipe": want, "base": kind, "parameters": count_parameters(model),
                "vocab_size": len(tokenizer), "tokenizer_sha256": tokenizer_sha256,
                "weights_sha256": weights_sha256}
    write_json(manifest_path, manifest)
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
                    help="alias of `python -m knowlm_nb.copybase --zoo OUT --out DIR`: "
                         "pretrain the copy-capable base (114 min on 2 cores) into DIR "
                         f"(the shipped one is {SHIPPED_BASE.relative_to(ROOT)})")
    ap.add_argument("--resume", metavar="DIR", default=None, help="with --pretrain-base: see copybase")
    ap.add_argument("--steps", type=int, default=None, help="with --pretrain-base: see copybase")
    args = ap.parse_args(argv)
    if args.pretrain_base:  # the recipe lives in copybase, which imports this module: run it
        cmd = [sys.executable, "-m", "knowlm_nb.copybase", "--zoo", args.out,
               "--out", args.pretrain_base, "--profile", args.profile]
        for flag, value in (("--seed", args.seed), ("--resume", args.resume), ("--steps", args.steps)):
            cmd += [flag, str(value)] if value is not None else []
        return subprocess.run(cmd + (["--force"] if args.force else [])).returncode
    try:
        p = config.notebook_params(args.profile, "00")
        settings = zoo_settings(p) | ({} if args.seed is None else {"seed": args.seed})
        zoo = build_zoo(Path(args.out), force=args.force, **settings)
    except (ZooError, FilesError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(zoo.manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
