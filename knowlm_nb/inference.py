"""Inference: load a model (fp32, bf16, 8-bit, int8), decode with honest presets, stream, export GGUF.

* :func:`load` reads a local Hugging Face folder in one of :data:`QUANTIZATIONS`:
  ``fp32`` / ``bf16``; ``bnb8``, bitsandbytes ``BitsAndBytesConfig(load_in_8bit=True)``
  (``Linear8bitLt`` layers; CUDA at real scale, its CPU path here); ``int8``,
  torchao's int8 weight-only quantization, the fast CPU path. ``allocate``
  spreads a model over several GPUs (:func:`placement`, KnowLM's
  ``--multi_gpu --allocate [10,10,10]``).
* :data:`PRESETS` and :func:`generation_kwargs`: ``ie`` is greedy (or beams) and
  never samples, as KnowLM advises for extraction; ``chat`` samples
  (``do_sample=True`` with temperature, top_p, top_k). A sampling parameter
  given without sampling is an error instead of being silently ignored, which
  is what KnowLM's presets did.
* :func:`generate` / :func:`complete` stop at EOS, at a stop string, or at
  ``max_new_tokens``; :func:`stream` yields the text as it is made
  (``TextIteratorStreamer``).
* :func:`weight_bytes`, :func:`perplexity`, :func:`measure` and :func:`compare`
  give the memory / speed / quality table of the quantized paths, each path in
  a fresh process so its peak RSS is its own.
* :func:`export_gguf` writes a llama.cpp / Ollama GGUF file (architecture,
  byte-level BPE tokenizer as the ``gpt2`` tokenizer model with merges,
  weights in f16 or q8_0); :func:`check_gguf` loads it back with transformers'
  GGUF loader and compares logits with the source.

CLI::

    python -m knowlm_nb.inference export-gguf --model DIR --out FILE.gguf [--type f16|q8_0]
    python -m knowlm_nb.inference measure --model DIR --quantization int8 [--texts FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import ROOT, files

QUANTIZATIONS = ("fp32", "bf16", "bnb8", "int8")
GGUF_TYPES = ("f16", "q8_0")


class InferenceError(ValueError):
    """Bad input to loading, decoding or export; the message says what and why."""


# ------------------------------------------------------------------ loading

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def placement(allocate: list[int] | tuple[int, ...] | None, num_gpus: int | None = None,
              cpu_gib: int | None = None) -> dict:
    """``from_pretrained`` arguments that spread a model over GPUs with a memory cap each.

    KnowLM's ``--multi_gpu --allocate [10,10,10]`` meant "at most 10 GiB on
    each of three GPUs"; here that is ``device_map="auto"`` and
    ``max_memory={0: "10GiB", 1: "10GiB", 2: "10GiB"}`` (accelerate fills the
    GPUs in order and never goes over a cap). ``cpu_gib`` lets the rest spill to
    CPU RAM. ``allocate=None`` puts the whole model on one device.
    """
    if allocate is None:
        return {}
    if isinstance(allocate, (str, bytes)) or not isinstance(allocate, (list, tuple)) or not allocate:
        raise InferenceError(f"allocate must be a non-empty list of GiB per GPU, got {allocate!r}")
    for gib in allocate:
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0:
            raise InferenceError(f"allocate: every GPU's cap must be a positive number of GiB, "
                                 f"got {gib!r} in {list(allocate)}")
    if num_gpus is not None and num_gpus != len(allocate):
        raise InferenceError(f"allocate names {len(allocate)} GPU(s) but {num_gpus} are visible; "
                             "give one cap per GPU")
    max_memory: dict = {i: f"{gib}GiB" for i, gib in enumerate(allocate)}
    if cpu_gib is not None:
        if isinstance(cpu_gib, bool) or not isinstance(cpu_gib, (int, float)) or cpu_gib <= 0:
            raise InferenceError(f"cpu_gib must be a positive number, got {cpu_gib!r}")
        max_memory["cpu"] = f"{cpu_gib}GiB"
    return {"device_map": "auto", "max_memory": max_memory}


def load_kwargs(quantization: str = "fp32", allocate=None, cuda: bool | None = None,
                num_gpus: int | None = None) -> dict:
    """The ``from_pretrained`` keyword arguments :func:`load` uses (no files read)."""
    import torch

    if quantization not in QUANTIZATIONS:
        raise InferenceError(f"unknown quantization {quantization!r}; known: {', '.join(QUANTIZATIONS)}")
    cuda = cuda_available() if cuda is None else cuda
    if allocate is not None and not cuda:
        raise InferenceError("allocate (a memory cap per GPU) needs CUDA GPUs; none are visible")
    kw: dict = {"local_files_only": True}
    if quantization == "bf16":
        kw["dtype"] = torch.bfloat16
    elif quantization == "bnb8":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kw["dtype"] = torch.float16  # what is not int8 (embeddings, norms, lm_head) stays fp16
    else:  # fp32, and int8 which quantizes an fp32 model after loading
        kw["dtype"] = torch.float32
    if allocate is not None:
        kw.update(placement(allocate, num_gpus=num_gpus))
    elif quantization == "bnb8":
        kw["device_map"] = {"": 0} if cuda else "cpu"
    return kw


def _check_model_dir(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InferenceError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise InferenceError(f"{path} has no config.json: not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise InferenceError(f"{path} has no *.safetensors weights (only safetensors are loaded)")
    return path


def load_tokenizer(path: Path, tokenizer_path: Path | None = None):
    """The tokenizer of a model folder (or ``tokenizer_path``), with a pad token."""
    from transformers import AutoTokenizer

    where = Path(tokenizer_path or path)
    if not (where / "tokenizer.json").is_file() and not (where / "tokenizer.model").is_file():
        raise InferenceError(f"no tokenizer in {where}: pass tokenizer_path")
    tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantize_int8(model):
    """Int8 weight-only quantization of every ``nn.Linear`` (torchao), in place.

    torchao keeps one int8 weight and one scale per output row and multiplies
    in the activations' dtype, which is what makes it fast on CPU (bitsandbytes'
    CPU path goes through fp16 casts). Returns the model and which library did it.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:  # pragma: no cover - torchao is pinned; the old API is the fallback
        import torch

        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        return model, "torch.ao.quantization.quantize_dynamic (deprecated; torchao missing)"
    quantize_(model, Int8WeightOnlyConfig())
    return model, "torchao Int8WeightOnlyConfig"


def load(path: str | Path, quantization: str = "fp32", adapter: str | Path | None = None,
         tokenizer_path: str | Path | None = None, allocate=None):
    """``(model, tokenizer)`` from a local folder, in ``quantization`` (one of :data:`QUANTIZATIONS`).

    ``adapter`` is a PEFT LoRA folder put on top (merged into fp32/bf16/int8
    weights before quantizing; kept as a LoRA layer over 8-bit bitsandbytes
    weights, as KnowLM served it). ``allocate`` = GiB per GPU (see :func:`placement`).
    """
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(Path(path))
    kw = load_kwargs(quantization, allocate=allocate)
    tok = load_tokenizer(path, tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise InferenceError(f"{adapter} has no adapter_config.json: not a PEFT adapter folder")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        if quantization != "bnb8":
            model = model.merge_and_unload()
    if quantization == "int8":
        model, _ = quantize_int8(model)
    model.eval()
    return model, tok


def weight_bytes(model) -> int:
    """Bytes the model's weights and buffers take, quantized layouts included.

    A torchao quantized weight is counted through its inner tensors (int8 data
    and scales), a bitsandbytes one as its int8 data plus its scales (``SCB``).
    """
    import torch

    def size(t) -> int:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        n = t.numel() * t.element_size()
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            n += scb.numel() * scb.element_size()
        return n

    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += size(t)
    return total


def count_linear8bit(model) -> int:
    """How many bitsandbytes ``Linear8bitLt`` layers the model has."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:  # pragma: no cover
        return 0
    return sum(isinstance(m, Linear8bitLt) for m in model.modules())


def model_device(model):
    return next(model.parameters()).device


# ------------------------------------------------------------------ decoding

# KnowLM's extraction advice: greedy or beams, never sampling. Chat samples.
PRESETS: dict[str, dict] = {
    "ie": {"do_sample": False, "num_beams": 1, "max_new_tokens": 64, "repetition_penalty": 1.0},
    "chat": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
             "max_new_tokens": 128, "repetition_penalty": 1.1},
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
# name -> (type, lowest allowed, highest allowed or None, lowest is inclusive)
PARAMETERS: dict[str, tuple] = {
    "max_new_tokens": (int, 1, None, True),
    "num_beams": (int, 1, 16, True),
    "do_sample": (bool, None, None, True),
    "temperature": (float, 0.0, 100.0, False),
    "top_p": (float, 0.0, 1.0, False),
    "top_k": (int, 0, None, True),
    "repetition_penalty": (float, 0.0, 10.0, False),
    "stop": (list, None, None, True),
    "seed": (int, 0, None, True),
}


def check_parameter(name: str, value):
    """``value`` checked and normalised for generation parameter ``name``; an error says why not."""
    if name not in PARAMETERS:
        raise InferenceError(f"unknown generation parameter {name!r}; known: {', '.join(PARAMETERS)}")
    kind, low, high, inclusive = PARAMETERS[name]
    if kind is bool:
        if not isinstance(value, bool):
            raise InferenceError(f"{name} must be true or false, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
            raise InferenceError(f"{name} must be a list of non-empty strings, got {value!r}")
        if len(value) > 16:
            raise InferenceError(f"{name}: at most 16 stop strings, got {len(value)}")
        return list(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InferenceError(f"{name} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InferenceError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InferenceError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (value == low and not inclusive)):
        raise InferenceError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    if high is not None and value > high:
        raise InferenceError(f"{name} must be <= {high}, got {value!r}")
    return value


def generation_kwargs(preset: str = "ie", **overrides) -> dict:
    """The decoding settings of ``preset`` with ``overrides``, checked.

    Sampling parameters (temperature, top_p, top_k) only act when
    ``do_sample=True``; giving one to a non-sampling setting is an error
    (transformers would ignore it, as KnowLM's presets silently did).
    """
    if preset not in PRESETS:
        raise InferenceError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset])
    for name, value in overrides.items():
        kw[name] = check_parameter(name, value)
    if not kw.get("do_sample"):
        given = [k for k in SAMPLING_KEYS if k in overrides]
        if given:
            raise InferenceError(
                f"sampling parameter(s) {', '.join(given)} have no effect without sampling, and "
                f"this setting does not sample (preset {preset!r}, do_sample=False): pass "
                "do_sample=True or use preset='chat', or drop them")
        for k in SAMPLING_KEYS:
            kw.pop(k, None)
    return kw


@dataclass
class Generation:
    text: str
    new_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)


def _prepare(model, tokenizer, prompt: str, preset: str, overrides: dict):
    import torch

    if not isinstance(prompt, str):
        raise InferenceError(f"prompt must be a string, got {type(prompt).__name__}")
    kw = generation_kwargs(preset, **overrides)
    stop = kw.pop("stop", None) or []
    seed = kw.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    kw.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if stop:
        kw.update(stop_strings=stop, tokenizer=tokenizer)
    return enc, kw, stop


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def complete(model, tokenizer, prompt: str, preset: str = "ie", **overrides) -> Generation:
    """One completion of ``prompt`` with its token count and why it stopped.

    Stops at EOS, at the first of ``stop`` (the text is cut before it), or
    after ``max_new_tokens``; so nothing runs away.
    """
    import torch

    enc, kw, stop = _prepare(model, tokenizer, prompt, preset, overrides)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    row = out[0, enc["input_ids"].shape[1]:].tolist()
    reason = "length"
    if tokenizer.eos_token_id in row:
        row = row[:row.index(tokenizer.eos_token_id)]
        reason = "eos"
    while row and row[-1] == tokenizer.pad_token_id:
        row.pop()
    text = tokenizer.decode(row, skip_special_tokens=True)
    text, stopped = _cut(text, stop)
    if stopped:
        reason = "stop"
    return Generation(text=text, new_tokens=len(row), finish_reason=reason)


def generate(model, tokenizer, prompt: str, preset: str = "ie", **overrides) -> str:
    """The completion of ``prompt`` (text only); see :func:`complete`."""
    return complete(model, tokenizer, prompt, preset, **overrides).text


def stream(model, tokenizer, prompt: str, preset: str = "ie", **overrides) -> Iterator[str]:
    """Yield the completion piece by piece as the model writes it (``TextIteratorStreamer``).

    Generation runs in a background thread; stop strings end it early and the
    text after a stop string is not yielded.
    """
    import torch
    from transformers import TextIteratorStreamer

    enc, kw, stop = _prepare(model, tokenizer, prompt, preset, overrides)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=600)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**enc, **kw, streamer=streamer)
        except BaseException as exc:  # surfaced in the caller's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    sent = ""
    held = ""
    longest = max((len(s) for s in stop), default=0)
    stopped = False
    for piece in streamer:
        held += piece
        text, stopped = _cut(sent + held, stop)
        if stopped:
            if len(text) > len(sent):
                yield text[len(sent):]
            break
        # keep back a tail that could be the start of a stop string
        safe = len(held) - (longest - 1) if longest else len(held)
        if safe > 0:
            yield held[:safe]
            sent += held[:safe]
            held = held[safe:]
    if stopped:
        for _ in streamer:  # drain what generate still writes, so its thread ends
            pass
    elif held:
        yield held
    thread.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------ measuring

def perplexity(model, tokenizer, texts: Iterable[str], max_len: int = 128) -> float:
    """exp(mean next-token cross-entropy) over ``texts`` (each cut at ``max_len`` tokens)."""
    from . import tiny

    try:
        return math.exp(tiny.mean_loss(model, tokenizer, texts, max_len=max_len))
    except tiny.ZooError:
        raise InferenceError("perplexity needs texts of at least two tokens") from None


def heldout_texts(n: int = 40, data: Path = ROOT / "data_samples" / "ie") -> list[str]:
    """Held-out sentences: the ``input`` texts of the IE evaluation sets (zh and en), deduplicated."""
    out: list[str] = []
    seen: set[str] = set()
    paths = [data / "eval_en.jsonl", data / "eval_zh.jsonl"]
    rows = [list(files.iter_jsonl(p)) for p in paths]
    for pair in zip(*rows):
        for _, rec in pair:
            text = rec.get("input", "")
            if text and text not in seen:
                seen.add(text)
                out.append(text)
        if len(out) >= n:
            break
    return out[:n]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (``VmHWM``; ``ru_maxrss`` would include the
    parent's peak, which a forked child inherits)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_dir: str | Path, quantization: str, texts: list[str], prompts: list[str],
            max_new_tokens: int = 16) -> dict:
    """One quantization path, measured in this process: weights, RSS, perplexity, speed, outputs.

    Run it in a fresh process (:func:`compare` does) so peak RSS belongs to this path alone.
    """
    import torch

    before = rss_mb()
    t = time.perf_counter()
    model, tok = load(model_dir, quantization)
    load_s = time.perf_counter() - t
    loaded = rss_mb()
    ppl = perplexity(model, tok, texts)
    outputs, new_tokens = [], 0
    t = time.perf_counter()
    for prompt in prompts:
        g = complete(model, tok, prompt, "ie", max_new_tokens=max_new_tokens)
        outputs.append(g.text)
        new_tokens += g.new_tokens
    gen_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    return {
        "quantization": quantization,
        "parameters": params,
        "linear8bit_layers": count_linear8bit(model),
        "weight_mb": weight_bytes(model) / 2**20,
        "rss_before_load_mb": before,
        "rss_loaded_mb": loaded,
        "peak_rss_mb": peak_rss_mb(),
        "load_s": load_s,
        "perplexity": ppl,
        "new_tokens": new_tokens,
        "generate_s": gen_s,
        "tokens_per_s": new_tokens / gen_s if gen_s > 0 else float("nan"),
        "outputs": outputs,
        "threads": torch.get_num_threads(),
    }


def interleaved_speed(model_dir: str | Path, quantizations: Iterable[str], prompt: str,
                      new_tokens: int = 8, rounds: int = 3) -> dict[str, float]:
    """Greedy tokens/s of each path, all loaded in this process and timed in turns.

    Every round times each path once, in order, on exactly ``new_tokens``
    tokens (EOS ignored); the best round of each path counts. Taking turns
    makes the ratios fair on a machine whose load changes while it runs,
    which one process per path, one after the other, is not.
    """
    import torch

    models = {q: load(model_dir, q) for q in quantizations}
    best = {q: float("inf") for q in models}
    for _ in range(rounds):
        for q, (model, tok) in models.items():
            enc = tok(prompt, return_tensors="pt")
            enc = {k: v.to(model_device(model)) for k, v in enc.items()}
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
            best[q] = min(best[q], time.perf_counter() - t)
    return {q: new_tokens / s for q, s in best.items()}


def compare(model_dir: str | Path, quantizations: Iterable[str] = QUANTIZATIONS,
            texts: list[str] | None = None, prompts: list[str] | None = None,
            max_new_tokens: int = 16, parameters: int | None = None,
            speed_rounds: int = 3) -> list[dict]:
    """Measure each path in its own process, side by side, and relate it to ``fp32``.

    Rows gain ``weight_vs_fp16`` (weight memory over 2 bytes x parameters),
    ``ppl_change`` (relative to fp32), ``speed_vs_fp32`` and ``same_greedy``
    (share of greedy outputs identical to fp32's). ``fp32`` is measured first
    when it is not in ``quantizations``. ``tokens_per_s`` comes from
    :func:`interleaved_speed` (paths timed in turns, ``speed_rounds`` rounds);
    ``tokens_per_s_alone`` is each process's own figure, which drifts with the
    machine's load.
    """
    quantizations = list(quantizations)
    for q in quantizations:
        if q not in QUANTIZATIONS:
            raise InferenceError(f"unknown quantization {q!r}; known: {', '.join(QUANTIZATIONS)}")
    texts = texts if texts is not None else heldout_texts()
    prompts = prompts if prompts is not None else texts[:8]
    order = ["fp32"] + [q for q in quantizations if q != "fp32"]
    rows = []
    for q in order:
        rows.append(_measure_in_subprocess(model_dir, q, texts, prompts, max_new_tokens))
    if speed_rounds > 0 and prompts:
        speed = interleaved_speed(model_dir, order, prompts[0], max_new_tokens, speed_rounds)
        for row in rows:
            row["tokens_per_s_alone"] = row["tokens_per_s"]
            row["tokens_per_s"] = speed[row["quantization"]]
    base = rows[0]
    n_params = parameters or base["parameters"]
    for row in rows:
        row["weight_vs_fp16"] = row["weight_mb"] * 2**20 / (2 * n_params)
        row["weight_vs_fp32"] = row["weight_mb"] / base["weight_mb"]
        row["ppl_change"] = row["perplexity"] / base["perplexity"] - 1
        row["speed_vs_fp32"] = row["tokens_per_s"] / base["tokens_per_s"]
        same = sum(a == b for a, b in zip(row["outputs"], base["outputs"]))
        row["same_greedy"] = same / max(1, len(base["outputs"]))
    return [r for r in rows if r["quantization"] in quantizations]


WIDE_DIMS = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 8,
             "intermediate_size": 1536, "max_position": 512}


def build_wide_model(out: str | Path, tokenizer_dir: str | Path, seed: int = 0, **dims) -> Path:
    """A randomly initialised Llama of tens of millions of parameters (:data:`WIDE_DIMS`), saved.

    Its weights are random: it is there for memory and speed ratios, where the
    share of parameters inside ``Linear`` layers decides what 8-bit saves (as in
    a 7B / 13B model). Its perplexity is that of a random model, so a
    perplexity change measured on it means nothing. Reused when already built.
    """
    from . import tiny

    out = Path(out)
    dims = {**WIDE_DIMS, **dims}
    stamp = json.dumps({"seed": seed, **dims}, sort_keys=True)
    if (out / "wide.json").is_file() and (out / "wide.json").read_text() == stamp:
        return out
    tok = load_tokenizer(Path(tokenizer_dir))
    model = tiny.build_model(tiny.model_config(tok, **dims), seed=seed)
    with files.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "wide.json").write_text(stamp)
    return out


def _measure_in_subprocess(model_dir, quantization, texts, prompts, max_new_tokens) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="knowlm-measure-") as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "row.json"
        files.write_json(spec, {"texts": texts, "prompts": prompts})
        cmd = [sys.executable, "-m", "knowlm_nb.inference", "measure", "--model", str(model_dir),
               "--quantization", quantization, "--spec", str(spec), "--out", str(out),
               "--max-new-tokens", str(max_new_tokens)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise InferenceError(f"measuring {quantization} failed:\n{tail}")
        return json.loads(out.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ GGUF

def _llama_permute(w, n_head: int):
    """llama.cpp's row order for q/k projections (rotary pairs interleaved), as its converter writes."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _merges(tokenizer) -> list[str]:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise InferenceError(f"GGUF export handles byte-level BPE tokenizers; this one is "
                             f"{model.get('type')!r}")
    pre = json.dumps(data.get("pre_tokenizer"))
    if "ByteLevel" not in pre:
        raise InferenceError("GGUF export handles byte-level BPE tokenizers; this one has no "
                             "ByteLevel pre-tokenizer")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16") -> dict:
    """Write a Llama model folder as a GGUF file for llama.cpp / Ollama; return what was written.

    Metadata: the ``llama`` architecture (sizes, rope, norm epsilon), the
    tokenizer as llama.cpp's ``gpt2`` model (byte-level BPE: tokens, types,
    merges, special ids). Weights: 2-D tensors in ``f16`` or ``q8_0`` (blocks
    of 32 int8 with one fp16 scale), norms in f32; q/k rows in llama.cpp's
    rotary order. The file appears whole or not at all.
    """
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    if qtype not in GGUF_TYPES:
        raise InferenceError(f"unknown GGUF type {qtype!r}; known: {', '.join(GGUF_TYPES)}")
    model_dir = _check_model_dir(Path(model_dir))
    out = Path(out)
    if out.suffix != ".gguf":
        raise InferenceError(f"the output file should end in .gguf, got {out.name!r}")
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise InferenceError(f"GGUF export handles Llama models; {model_dir} is "
                             f"{cfg.get('model_type')!r}")
    tok = load_tokenizer(model_dir)
    merges = _merges(tok)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    n_layer = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)

    af = files.AtomicFile(out, "wb")
    try:
        writer = gguf.GGUFWriter(str(af.scratch), "llama")
        writer.add_name(model_dir.name)
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_embedding_length(cfg["hidden_size"])
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta)
        writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16"
                             else gguf.LlamaFileType.MOSTLY_Q8_0)
        # tokenizer: byte-level BPE is llama.cpp's "gpt2" model
        vocab = tok.convert_ids_to_tokens(list(range(cfg["vocab_size"])))
        special = set(tok.all_special_ids)
        added = {i for i, t in tok.added_tokens_decoder.items() if not t.special}
        types = [gguf.TokenType.CONTROL if i in special else
                 gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
                 for i in range(len(vocab))]
        if any(t is None for t in vocab):
            raise InferenceError("the tokenizer has fewer tokens than the model's vocab_size")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(vocab)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for key, fn in (("bos_token_id", writer.add_bos_token_id),
                        ("eos_token_id", writer.add_eos_token_id),
                        ("unk_token_id", writer.add_unk_token_id),
                        ("pad_token_id", writer.add_pad_token_id)):
            value = getattr(tok, key, None)
            if value is not None:
                fn(value)
        bos_added = tok("a")["input_ids"][:1] == [tok.bos_token_id]
        writer.add_add_bos_token(bool(bos_added))
        writer.add_add_eos_token(False)

        counts = {"f16": 0, "f32": 0, "q8_0": 0}
        for hf_name, tensor in state.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise InferenceError(f"no GGUF name for tensor {hf_name!r}")
            w = tensor.to(torch.float32)
            if hf_name.endswith("q_proj.weight"):
                w = _llama_permute(w, n_head)
            elif hf_name.endswith("k_proj.weight"):
                w = _llama_permute(w, n_kv)
            data = w.numpy()
            if data.ndim == 1:
                writer.add_tensor(name, data.astype(np.float32))
                counts["f32"] += 1
            elif qtype == "q8_0" and data.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                counts["q8_0"] += 1
            else:
                writer.add_tensor(name, data.astype(np.float16))
                counts["f16"] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        af.commit()
    except BaseException:
        af.abort()
        raise
    return {"path": str(out), "type": qtype, "bytes": out.stat().st_size, "tensors": counts,
            "vocab": len(vocab), "merges": len(merges)}


def check_gguf(model_dir: str | Path, gguf_path: str | Path, texts: list[str]) -> dict:
    """Load a GGUF file back with transformers' GGUF loader and compare it with the source.

    Returns the largest absolute logit difference (and the largest relative to
    the logits' spread), the share of positions whose top token agrees, and
    whether the GGUF tokenizer gives the same ids as the source tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InferenceError(f"GGUF file not found: {gguf_path}")
    src, tok = load(model_dir, "fp32")
    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32, local_files_only=True)
    back.eval()
    gtok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                         local_files_only=True)
    max_abs, max_rel, agree, total, same_ids = 0.0, 0.0, 0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            a = src(input_ids=ids).logits[0]
            b = back(input_ids=ids).logits[0]
            diff = (a - b).abs().max().item()
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / (a.max() - a.min()).item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            total += ids.shape[1]
            same_ids += gtok(text)["input_ids"] == ids[0].tolist()
    return {"max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_rel,
            "top1_agreement": agree / max(1, total), "same_token_ids": same_ids / max(1, len(texts)),
            "texts": len(texts)}


# ------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.inference",
                                 description="8-bit / int8 inference helpers and GGUF export.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp / Ollama")
    ex.add_argument("--model", required=True, help="a local Hugging Face Llama folder")
    ex.add_argument("--out", required=True, help="the .gguf file to write")
    ex.add_argument("--type", default="f16", choices=GGUF_TYPES)
    ex.add_argument("--check", action="store_true",
                    help="load the file back with transformers and compare logits")
    me = sub.add_parser("measure", help="measure one quantization path (run by compare)")
    me.add_argument("--model", required=True)
    me.add_argument("--quantization", required=True, choices=QUANTIZATIONS)
    me.add_argument("--spec", help="JSON with 'texts' and 'prompts' (default: held-out IE inputs)")
    me.add_argument("--out", help="write the row here as JSON (default: print it)")
    me.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        if args.command == "export-gguf":
            info = export_gguf(args.model, args.out, args.type)
            if args.check:
                info["check"] = check_gguf(args.model, args.out, heldout_texts(8))
            print(json.dumps(info, indent=2, ensure_ascii=False))
        else:
            if args.spec:
                spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
            else:
                texts = heldout_texts()
                spec = {"texts": texts, "prompts": texts[:8]}
            row = measure(args.model, args.quantization, spec["texts"], spec["prompts"],
                          args.max_new_tokens)
            if args.out:
                files.write_json(Path(args.out), row)
            else:
                print(json.dumps(row, indent=2, ensure_ascii=False))
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
