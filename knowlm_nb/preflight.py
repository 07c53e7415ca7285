"""Checks a run's path parameters and hardware needs up front, each problem with its fix.

Before the batch runner starts the first notebook, and at the top of every
notebook (``config.resolve``), this module looks at every path parameter the
notebook takes and at every setting that needs CUDA, and reports *all* the
problems at once: the parameter, the path, what was expected there and the fix
(``-p tokenizer_path /path/to/llama-7b-hf``, or ``--profile tiny``). Nothing
runs and nothing is written.

What "must exist" means (one rule, the same in the runner and in a notebook):

* an explicit path (``base_model = "/data/llama-7b-hf"``) must hold what its
  parameter needs (:data:`PARAMETERS`: a model folder has ``config.json`` and
  weights, a tokenizer folder ``tokenizer.json`` or ``tokenizer.model``, an
  adapter folder ``adapter_config.json``, a dataset ``PREFIX.bin`` and
  ``PREFIX.idx``, ...), unless a notebook earlier in the same batch run writes
  exactly that path;
* an empty path ``""`` means "the artifact the upstream notebook writes into
  ``workdir``" (``config.UPSTREAM``). It is fine when an upstream notebook of
  the same run writes it, or when it is already there. When it is missing:
  on the ``tiny`` profile every notebook builds it itself at tiny scale (the
  house rule: a notebook runs standalone on a fresh checkout), so that is a
  note, not an error; on any other profile a tiny stand-in would be wrong (a
  7B run on a toy dataset), so it is an error that says which notebook to run
  first or which path to pass;
* an empty path with no upstream artifact (``hostfile``, ``deepspeed_config``)
  means "not used".

New notebooks add rows: a path parameter to :data:`PARAMETERS` (by name, or by
``(notebook, name)`` when one notebook needs something else), a CUDA need to
:data:`CUDA_NEEDS`. ``require`` is the loaders' guard: the project checks a
local folder before handing it to ``from_pretrained`` (which would otherwise
answer a missing folder with a model-hub error about repo ids).

This module reads a resolved ``config.Config`` (duck-typed) and never imports
``config``, so that ``config.resolve`` can call it without an import cycle.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import ROOT, files

BASE_PROFILE = "tiny"     # the profile whose notebooks build missing upstream artifacts themselves


class PreflightError(ValueError):
    """One or more problems found before running; the message lists them all, with fixes."""

    def __init__(self, findings: Iterable["Finding"], header: str = ""):
        self.findings = [f for f in findings if f.level == "error"]
        lines = [header or "cannot run: the preflight found problems (nothing was run or written)"]
        lines += [f"- {f.message}" for f in self.findings]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Finding:
    notebook: str
    parameter: str
    level: str      # "error" (the run cannot start) | "ok" | "note" (fine, worth saying)
    message: str


# ------------------------------------------------------------ what a path holds

def _weights(d: Path) -> list[Path]:
    return sorted(p for pat in ("*.safetensors", "*.bin") for p in d.glob(pat)
                  if not p.name.startswith(("adapter_", "training_args", "optimizer")))


def _missing_model(p: Path) -> str:
    if not (p / "config.json").is_file():
        return "has no config.json"
    if not _weights(p):
        return "has config.json but no weights (*.safetensors or pytorch_model*.bin)"
    return ""


def _missing_tokenizer(p: Path) -> str:
    if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file():
        return ""
    return "has no tokenizer.json or tokenizer.model"


def _missing_adapter(p: Path) -> str:
    if not (p / "adapter_config.json").is_file():
        return "has no adapter_config.json"
    if not any((p / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        return "has adapter_config.json but no adapter_model.safetensors or .bin"
    return ""


def _missing_dataset(p: Path) -> str:
    absent = [q.name for q in (Path(f"{p}.bin"), Path(f"{p}.idx")) if not q.is_file()]
    return f"lacks {' and '.join(absent)}" if absent else ""


def _missing_file(p: Path) -> str:
    return "" if p.is_file() else "is not a file"


def _missing_json(p: Path) -> str:
    if not p.is_file():
        return "is not a file"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"is not valid JSON ({exc})"
    return "" if isinstance(data, dict) else "is JSON but not an object"


def _missing_glob(pattern: str) -> str:
    try:
        files.find_files(pattern)
    except files.FilesError:
        return "matches no file"
    return ""


@dataclass(frozen=True)
class Kind:
    """A kind of path: what must be there, and how to tell."""
    what: str                          # "a Hugging Face model folder"
    expected: str                      # "config.json and weights (*.safetensors or *.bin)"
    missing: Callable[[Any], str]      # "" when the path holds one, else what is missing
    folder: bool = True                # a folder (model, tokenizer, adapter) or not


KINDS: dict[str, Kind] = {
    "model": Kind("a Hugging Face model folder",
                  "config.json and weights (*.safetensors or pytorch_model*.bin)", _missing_model),
    "tokenizer": Kind("a Hugging Face tokenizer folder (a model folder has one)",
                      "tokenizer.json or tokenizer.model", _missing_tokenizer),
    "adapter": Kind("a PEFT LoRA adapter folder",
                    "adapter_config.json and adapter_model.safetensors", _missing_adapter),
    "dataset": Kind("a Megatron indexed dataset prefix", "PREFIX.bin and PREFIX.idx",
                    _missing_dataset, folder=False),
    "hostfile": Kind("a DeepSpeed hostfile", "a text file, one 'HOST slots=N' per line",
                     _missing_file, folder=False),
    "deepspeed": Kind("a DeepSpeed config", "a JSON object (env/deepspeed/*.json)",
                      _missing_json, folder=False),
    "glob": Kind("a file pattern", "at least one matching file (relative to the repository)",
                 _missing_glob, folder=False),
}


@dataclass(frozen=True)
class PathParameter:
    kind: str       # a key of KINDS
    example: str    # the value shown in the fix: -p NAME EXAMPLE
    empty: str = "" # what "" means when no upstream notebook writes it ("" = not used)


# Path parameters by name (or (notebook, name) when one notebook needs another kind).
PARAMETERS: dict[str | tuple[str, str], PathParameter] = {
    "corpus_glob": PathParameter("glob", "'/path/to/corpus/*.jsonl'"),
    "tokenizer_path": PathParameter("tokenizer", "/path/to/llama-7b-hf"),
    "base_model": PathParameter("model", "/path/to/llama-7b-hf"),
    "tuned_model": PathParameter("model", "/path/to/zhixi-13b-diff"),
    "model_path": PathParameter("model", "/path/to/zhixi-13b"),
    "adapter_path": PathParameter("adapter", "/path/to/zhixi-13b-lora"),
    "dataset_prefix": PathParameter("dataset", "/path/to/data/pretrain_text_document"),
    "hostfile": PathParameter("hostfile", "env/hostfile.example", "this machine only"),
    "deepspeed_config": PathParameter("deepspeed", "env/deepspeed/zero3.json",
                                      "the plain Trainer, no DeepSpeed"),
}


def parameter_row(notebook: str, name: str) -> PathParameter | None:
    return PARAMETERS.get((notebook, name)) or PARAMETERS.get(name)


def _hints(path: Path, kind: str) -> list[str]:
    """What the path holds instead, when that says what went wrong."""
    hints = []
    if KINDS[kind].folder and path.is_file():
        hints.append("it is a file, not a folder")
    if kind == "dataset" and path.suffix in (".bin", ".idx"):
        hints.append(f"give the prefix without {path.suffix}: {path.with_suffix('')}")
    if path.is_dir():
        if kind != "adapter" and (path / "adapter_config.json").is_file():
            hints.append("it holds a LoRA adapter (adapter_config.json): pass it as adapter_path "
                         "and the model it was trained on as base_model")
        if kind == "adapter" and (path / "config.json").is_file():
            hints.append("it holds a full model (config.json), not an adapter")
        if kind in ("model", "tokenizer"):
            inside = sorted(p.parent for p in path.glob("*/config.json"))[:3]
            if inside:
                hints.append("model folders inside it: " + ", ".join(str(p) for p in inside))
    return hints


def missing(path: str | Path, kind: str) -> str:
    """"" when ``path`` holds a ``kind`` (see :data:`KINDS`), else what is missing there."""
    if kind == "glob":
        return _missing_glob(str(path))
    path = Path(path)
    if KINDS[kind].folder and not path.is_dir():
        return "is not a folder" if path.exists() else "does not exist"
    if not KINDS[kind].folder and kind != "dataset" and not path.exists():
        return "does not exist"
    return KINDS[kind].missing(path)


def describe(path: str | Path, kind: str, parameter: str = "") -> str:
    """The project's message for a path that does not hold a ``kind``: what is
    there, what was expected, and the fix."""
    k = KINDS[kind]
    what = missing(path, kind)
    where = f"{parameter}: " if parameter else ""
    text = f"{where}{path} {what}; expected {k.what}: {k.expected}"
    hints = _hints(Path(path), kind) if kind != "glob" else []
    if hints:
        text += " (" + "; ".join(hints) + ")"
    return text


def require(path: str | Path, kind: str, parameter: str = "") -> Path:
    """``path`` as a :class:`Path` if it holds a ``kind``; else :class:`PreflightError`.

    The loaders call this before ``from_pretrained(..., local_files_only=True)``,
    so a wrong local path reads "does not exist; expected ...", never a model-hub
    error about repo ids.
    """
    if missing(path, kind):
        fix = ""
        row = PARAMETERS.get(parameter)
        if row:
            fix = f"; fix: -p {parameter} {row.example}"
        raise PreflightError([Finding("", parameter, "error", describe(path, kind, parameter) + fix)],
                             header=f"not found: {path}")
    return Path(path)


# ------------------------------------------------------------------ the machine

@dataclass(frozen=True)
class Machine:
    gpus: int          # CUDA devices
    bf16: bool         # every one supports bfloat16 (Ampere or newer)
    cpus: int

    def describe(self) -> str:
        gpu = f"{self.gpus} CUDA GPU(s)" + ("" if self.bf16 or not self.gpus else ", no bf16")
        return f"{gpu if self.gpus else 'no CUDA GPU'}, {self.cpus} CPU cores"


def machine() -> Machine:
    """This machine's CUDA GPUs (0 without CUDA) and CPU cores."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bf16 = bool(gpus) and torch.cuda.is_bf16_supported()
    return Machine(gpus=gpus, bf16=bf16, cpus=os.cpu_count() or 1)


def _eight_bit(value, params, m: Machine) -> str:
    if value and not m.gpus:
        return ("load_in_8bit = True trains on a base loaded in 8-bit (bitsandbytes), which needs "
                "a CUDA GPU and this machine has none; on CPU: -p load_in_8bit false "
                "(LoRA on the fp32 base), or --profile tiny")
    return ""


def _precision(value, params, m: Machine) -> str:
    if value in ("fp16", "bf16") and not m.gpus:
        return (f"precision = {value!r} is mixed precision on CUDA GPUs and this machine has none; "
                "on CPU: -p precision fp32, or --profile tiny")
    if value == "bf16" and m.gpus and not m.bf16:
        return ("precision = 'bf16' needs an Ampere or newer GPU and this one has no bfloat16; "
                "use -p precision fp16 (V100, as KnowLM) or fp32")
    return ""


def _num_gpus(value, params, m: Machine) -> str:
    single = params.get("num_nodes", 1) == 1 and not params.get("hostfile")
    if m.gpus and single and value > m.gpus:
        return (f"num_gpus = {value} processes on this machine, which has {m.gpus} CUDA GPU(s); "
                f"use -p num_gpus {m.gpus}, or a hostfile and num_nodes for more machines")
    return ""


@dataclass(frozen=True)
class CudaNeed:
    notebook: str      # the notebook whose parameter it is
    parameter: str
    problem: Callable[[Any, Mapping, Machine], str]   # "" when this machine can do it


# Settings that need CUDA (or more GPUs than there are), per notebook. bitsandbytes
# 8-bit *inference* runs on CPU (notebook 05 on tiny), so only 03's 8-bit training is here.
CUDA_NEEDS: list[CudaNeed] = [
    CudaNeed("02", "precision", _precision),
    CudaNeed("02", "num_gpus", _num_gpus),
    CudaNeed("03", "load_in_8bit", _eight_bit),
]


# ----------------------------------------------------------------------- checks

def _fix(cfg, name: str, row: PathParameter, upstream: tuple[str, str] | None) -> str:
    fix = f"fix: -p {name} {row.example}"
    if row.empty:
        fix += f" or -p {name} '' ({row.empty})"
    if upstream:
        fix += f', or leave it "" and run notebook {upstream[0]} first in the same workdir'
    if cfg.profile != BASE_PROFILE:
        fix += f", or --profile {BASE_PROFILE} (builds everything offline on CPU)"
    return fix


def check_paths(cfg, produced: Mapping[Path, str] | None = None) -> list[Finding]:
    """A finding for every path parameter of ``cfg`` (a resolved ``config.Config``).

    ``produced``: paths that notebooks earlier in the same run write, with
    the notebook that writes each one.
    """
    produced = produced or {}
    nb, out = cfg.notebook, []
    for name, value in sorted(cfg.params.items()):
        row = parameter_row(nb, name)
        if row is None:
            continue
        kind = KINDS[row.kind]
        upstream = cfg.upstream_of(name)
        if not value and upstream is None:
            out.append(Finding(nb, name, "ok", f'{name} = "": {row.empty or "not used"}'))
            continue
        if row.kind == "glob":
            if missing(value, "glob"):
                out.append(Finding(nb, name, "error", f"notebook {nb}: {name} = {value!r}: no file "
                                   f"matches; expected {kind.expected}; {_fix(cfg, name, row, None)}"))
            else:
                out.append(Finding(nb, name, "ok",
                                   f"{name} = {value!r}: {len(files.find_files(value))} files"))
            continue
        path = cfg.path(name)
        if path in produced:
            out.append(Finding(nb, name, "ok", f"{name}: {path}, written by notebook "
                               f"{produced[path]} earlier in this run"))
            continue
        what = missing(path, row.kind)
        if not what:
            out.append(Finding(nb, name, "ok", f"{name}: {path} ({kind.what.split(' (')[0]})"))
            continue
        if not value and cfg.profile == BASE_PROFILE:
            out.append(Finding(nb, name, "note", f'{name} = "": notebook {upstream[0]}\'s '
                               f"{upstream[1]} at {path} is missing; notebook {nb} builds it "
                               "at tiny scale"))
            continue
        shown = f"{name} = {value!r}" if value else \
            f'{name} = "" (the {upstream[1]} notebook {upstream[0]} writes)'
        out.append(Finding(nb, name, "error", f"notebook {nb}: {shown}: {describe(path, row.kind)}; "
                           f"{_fix(cfg, name, row, None if value else upstream)}"))
    return out


def check_machine(cfg, m: Machine | None = None) -> list[Finding]:
    """A finding for every setting of ``cfg`` this machine cannot run (CUDA, GPU count)."""
    out = []
    for need in CUDA_NEEDS:
        if need.notebook != cfg.notebook or need.parameter not in cfg.params:
            continue
        m = m or machine()
        problem = need.problem(cfg.params[need.parameter], cfg.params, m)
        value = cfg.params[need.parameter]
        out.append(Finding(cfg.notebook, need.parameter, "error",
                           f"notebook {cfg.notebook}: {problem} (this machine: {m.describe()})")
                   if problem else Finding(cfg.notebook, need.parameter, "ok",
                                           f"{need.parameter} = {value!r}: runs on this machine "
                                           f"({m.describe()})"))
    return out


def check(cfg, produced: Mapping[Path, str] | None = None,
          m: Machine | None = None) -> list[Finding]:
    """Every finding for one notebook: its path parameters, then what it needs of the machine."""
    return check_paths(cfg, produced) + check_machine(cfg, m)


def check_run(cfgs: list, m: Machine | None = None) -> dict[str, list[Finding]]:
    """Findings per notebook for a run of ``cfgs`` in order: an artifact a notebook
    writes counts as present for the notebooks after it."""
    produced: dict[Path, str] = {}
    out = {}
    needs_machine = any(n.notebook == c.notebook for c in cfgs for n in CUDA_NEEDS)
    m = m or (machine() if needs_machine else None)
    for cfg in cfgs:
        out[cfg.notebook] = check(cfg, produced, m)
        produced.update({p: cfg.notebook for p in cfg.outputs().values()})
    return out


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def raise_errors(findings: Iterable[Finding], header: str = "") -> None:
    """Raise :class:`PreflightError` listing every error among ``findings``; else return."""
    bad = errors(findings)
    if bad:
        raise PreflightError(bad, header)
