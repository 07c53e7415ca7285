"""Stage 03: LoRA instruction tuning for IE: templates, masking, the mix, training, NER evaluation.

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
  (:func:`knowlm_nb.names.fresh_records`), so the model must copy names;
  :func:`knowlm_nb.names.name_maker` invents them from ordinary words or
  from random syllables.
* :class:`MaskedCollator` - pads, and refuses a batch with no trainable
  target token (the original's "loss stuck at 0").
* :func:`train_lora` - PEFT LoRA with the HF Trainer (8-bit base on GPU);
  :func:`train_or_reuse` loads instead an adapter already saved from the same
  base, examples and settings (notebook 03's classroom mode, ``reuse_adapter``).
* :func:`evaluate_ner` - answers from :func:`knowlm_nb.decoding.generate`
  (greedy, or beam search with the copy constraint
  :func:`knowlm_nb.decoding.ner_copy_constraint`) scored with
  :func:`knowlm_nb.ie.score_ner`; :func:`repeat_rate` checks whether the
  base can copy the held-out names at all.
* :func:`load_base` / :func:`load_adapter` - a local base, and a saved
  adapter on top of it.

CLI (the notebook's script twin)::

    python -m knowlm_nb.instruct tune --base DIR --out DIR [--profile tiny] [--max-steps N]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from . import ROOT, ie
from .decoding import generate, ner_copy_constraint
from .files import atomic_dir, iter_jsonl
from .names import NamesError, fresh_records

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


def fresh_ie_examples(lang: str, n: int, seed: int = 0,
                      data: Path = ROOT / "data_samples", names: str = "words") -> list[dict]:
    """``n`` IE instructions from the training sentences of ``lang``.

    Each sentence gives one example, of a task drawn by :data:`TASK_WEIGHTS`
    among those it has annotations for. The first pass uses each sentence as
    written; after that every copy gets freshly invented names
    (:func:`knowlm_nb.names.fresh_records`) in the style ``names``
    (:func:`knowlm_nb.names.name_maker`), never one of the evaluation split's
    names.
    """
    rng = random.Random(seed)
    out: list[dict] = []
    for rec in fresh_records(lang, seed, data, names):
        if len(out) >= n:
            break
        options = ie.to_instructions(rec)
        out.append(rng.choices(options, [TASK_WEIGHTS.get(x["task"], 1) for x in options])[0])
    return out


def build_mix(total: int, seed: int = 0, val_share: float = 0.05,
              weights: dict[str, float] | None = None,
              data: Path = ROOT / "data_samples",
              names: str = "words") -> tuple[list[dict], list[dict], dict]:
    """(train, validation, counts): ``total`` examples in KnowLM's proportions.

    CoT, general and code examples are drawn in turn from the sample files
    (repeating them when the share asks for more); the two IE categories are
    fresh-name copies. ``names`` is the style of the fresh names
    (:func:`knowlm_nb.names.name_maker`). The validation share is split off
    after shuffling.
    """
    if not 0 <= val_share < 1:
        raise InstructError(f"val_share must be in [0, 1), got {val_share}")
    counts = mix_counts(total, weights)
    rng = random.Random(seed)
    rows: list[dict] = []
    for cat, n in counts.items():
        if cat.startswith("ie_"):
            picked = fresh_ie_examples(cat[3:], n, seed, data, names=names)
        else:
            pool = read_category(cat, data)
            if not pool and n:
                raise InstructError(f"no examples in category {cat!r}")
            rng.shuffle(pool)
            picked = [pool[i % len(pool)] for i in range(n)]
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
    from . import preflight  # a wrong local path: the project's 'not found'
    tok = AutoTokenizer.from_pretrained(preflight.require(path, "tokenizer"), local_files_only=True)
    if load_in_8bit:
        if not torch.cuda.is_available():
            raise InstructError("load_in_8bit needs a CUDA GPU (bitsandbytes); on CPU train in fp32")
        from transformers import BitsAndBytesConfig

        model = LlamaForCausalLM.from_pretrained(
            preflight.require(path, "model"), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map="auto", local_files_only=True)
    else:
        model = LlamaForCausalLM.from_pretrained(preflight.require(path, "model"), dtype=torch.float32,
                                                 local_files_only=True)
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
               seed: int = 0, precision: str = "fp32", progress: bool = True) -> dict:
    """Train the LoRA ``model`` with the HF Trainer, save the adapter to ``out``.

    ``max_steps`` > 0 wins over ``epochs``. Examples of similar length are
    batched together (the Trainer's length-grouped sampler), so less of each
    batch is padding: on the ``tiny`` mix 24% fewer token positions for the
    same examples. The adapter is written with ``save_pretrained`` into a
    scratch folder that replaces ``out`` whole (:func:`knowlm_nb.files.atomic_dir`),
    so an interrupted run leaves no half adapter. Returns the log history (training
    and validation loss), the seconds and the adapter's size.
    """
    from transformers import Trainer, TrainingArguments

    if not train_rows:
        raise InstructError("no training examples")
    out = Path(out)
    with atomic_dir(out) as scratch:
        args = TrainingArguments(
            output_dir=str(scratch / "trainer"), per_device_train_batch_size=micro_batch,
            per_device_eval_batch_size=micro_batch, gradient_accumulation_steps=grad_accum,
            learning_rate=learning_rate, max_steps=max_steps if max_steps > 0 else -1,
            num_train_epochs=epochs, lr_scheduler_type="cosine", warmup_steps=warmup_steps,
            weight_decay=0.0, logging_steps=max(1, min(25, eval_steps)),
            eval_strategy="steps" if val_rows else "no", eval_steps=eval_steps,
            save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            train_sampling_strategy="group_by_length",
            fp16=precision == "fp16", bf16=precision == "bf16", use_cpu=precision == "fp32" and
            not _cuda(), disable_tqdm=not progress, remove_unused_columns=False,
            dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(train_rows),
                          eval_dataset=_ListDataset(val_rows) if val_rows else None,
                          data_collator=MaskedCollator(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        shutil.rmtree(scratch / "trainer", ignore_errors=True)  # the Trainer's own files
        model.save_pretrained(scratch)
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
    from . import preflight  # a wrong local path: the project's 'not found'
    model = PeftModel.from_pretrained(base, preflight.require(adapter_dir, "adapter"), local_files_only=True)
    model.eval()
    return tok, model


# ------------------------------------------------------------- evaluation

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
    """The held-out IE examples of ``task`` (names never seen in training), language by language."""
    return [rec for lang in langs for rec in ie.eval_subset(task, lang, data=data)]


def evaluate_ner(model, tokenizer, examples: list[dict], template: Template,
                 max_new_tokens: int = 64, batch_size: int = 16,
                 copy_constrained: bool = False, num_beams: int = 1) -> tuple[list[str], dict]:
    """Generate an answer for each NER example and score it (exact, partial, type).

    Greedy by default: the model alone. ``copy_constrained`` decodes with
    :func:`knowlm_nb.decoding.ner_copy_constraint`, ``num_beams`` > 1 with beam search.
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
                                   names=p["fresh_names"])
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
    except (InstructError, NamesError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
