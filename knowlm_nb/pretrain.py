"""Stage 02: continued pretraining with the HF Trainer and DeepSpeed ZeRO.

KnowLM continued LLaMA-13B's pretraining on Chinese, English and code with the
Hugging Face Trainer plus DeepSpeed ZeRO-3 on 3 nodes x 8 V100-32GB. This
module is the same kind of run, for real, at any scale:

* **The entry point** ``python -m knowlm_nb.pretrain --profile NAME | --config
  FILE [--KEY VALUE ...]`` is what the ``deepspeed`` launcher or ``torchrun``
  starts in every process (it accepts ``--local_rank`` and ``LOCAL_RANK``). It
  trains a causal LM on notebook 01's indexed dataset, logs every step to
  ``OUTPUT_DIR/log.jsonl``, checkpoints every ``save_steps`` (and at the last
  step), resumes from the last complete checkpoint, and ends by measuring the
  held-out loss per language into ``OUTPUT_DIR/result.json``.
* **The launcher** :func:`launch_command` builds the exact ``deepspeed
  --hostfile ... --num_nodes ... --num_gpus ...`` or ``torchrun`` argv (a list,
  never a shell string); :func:`parse_hostfile` reads ``host slots=N`` files
  with errors that name file and line; :class:`Job` starts the command, streams
  its log, and can stop it (SIGTERM, then SIGKILL) after a given step.
* **Consolidation** :func:`consolidate` turns a ZeRO checkpoint (each rank
  holds a shard) into one Hugging Face safetensors model, with DeepSpeed's own
  ``zero_to_fp32`` converter.
* **Sizing** :func:`size_real_run` asks DeepSpeed's memory estimators what
  ZeRO-2 and ZeRO-3 need for LLaMA-13B on 32 GB GPUs and works out KnowLM's
  batch, tokens per second per GPU and MFU from its 260 s a step.

On CPU the processes talk over gloo. DeepSpeed then works with transformers 5
only when the accelerate state is made before ``TrainingArguments``
(``ACCELERATE_USE_DEEPSPEED=true``, ``PartialState(backend="gloo")``,
``accelerator_config={"use_configured_state": True}``); the optimizer is
torch's AdamW (DeepSpeed's CPU Adam takes minutes to compile). The first run
compiles a small communication op (about a minute, cached in
``~/.cache/torch_extensions``).

CLI (the script twin of notebook 02)::

    python -m knowlm_nb.pretrain --profile tiny --launch          # launch it here
    python -m knowlm_nb.pretrain --profile knowlm-13b --dry_run   # print the command
    python -m knowlm_nb.pretrain --consolidate RUN/checkpoint-40 --out DIR
    python -m knowlm_nb.pretrain --evaluate DIR --seq_len 256     # held-out loss
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import yaml

from . import ROOT, config, tiny

NOTEBOOK = "02"
MODULE = "knowlm_nb.pretrain"
LOG_PREFIX = "[knowlm] "
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
COMPLETE_MARKER = "knowlm_complete.json"
LAUNCHERS = ("deepspeed", "torchrun")
PRECISIONS = ("fp32", "fp16", "bf16")
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")

#: Held-out text for perplexity: the inputs of the IE evaluation split. They
#: are not in the pretraining corpus (data_samples/corpus), and none of their
#: names occurs anywhere in the training data (tests/test_data_samples.py).
HELDOUT = {"zh": "data_samples/ie/eval_zh.jsonl", "en": "data_samples/ie/eval_en.jsonl"}

#: KnowLM's pretraining run as published: LLaMA-13B, 3 nodes x 8 V100-32GB,
#: micro batch 20 x accumulation 3, samples of <= 1024 tokens, about 260 s a step.
KNOWLM_RUN = {"num_nodes": 3, "gpus_per_node": 8, "micro_batch": 20, "grad_accum": 3,
              "seq_len": 1024, "seconds_per_step": 260.0, "gpu_memory_gib": 32.0}
GIB = 2 ** 30  # memory in GiB, like DeepSpeed's printouts (a "32 GB" V100 has 32 GiB)
#: LLaMA-13B's shape (its config.json).
LLAMA_13B = {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
             "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
             "max_position_embeddings": 2048, "tie_word_embeddings": False}
#: V100-SXM2 peak dense fp16 with tensor cores (NVIDIA's data sheet; PCIe: 112).
V100_PEAK_TFLOPS = 125.0


class PretrainError(ValueError):
    """Bad input to pretraining; the message names the problem and the fix."""


# ================================================================== settings

def settings(profile: str | None = None, config_file: str | Path | None = None,
             overrides: Mapping | None = None) -> config.Config:
    """The resolved parameters of a run.

    Start from ``profile`` (default: the ``profile`` key of ``config_file``, else
    ``tiny``), apply the values in ``config_file`` (a YAML mapping of notebook
    02's parameters, e.g. the ``run.yaml`` the notebook writes), then
    ``overrides``. Names and types are checked against ``config.SCHEMA["02"]``.
    """
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise PretrainError(f"run config not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise PretrainError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise PretrainError(f"{path}: a run config must be a mapping of parameters")
    file_profile = values.pop("profile", None)
    values.update(overrides or {})
    values.pop("profile", None)
    params = config.notebook_params(profile or file_profile or config.BASE_PROFILE,
                                    NOTEBOOK, values)
    return config.Config(NOTEBOOK, params, config.workdir_for(params["profile"], params["workdir"]))


def optional_path(cfg: config.Config, name: str) -> Path | None:
    """A path parameter that may be empty ("" = not used): deepspeed_config, hostfile."""
    return cfg.path(name) if cfg.params.get(name) else None


def world_size(cfg: config.Config) -> int:
    return cfg.num_nodes * cfg.num_gpus


def write_run_config(cfg: config.Config, path: Path) -> Path:
    """Write ``cfg`` as a YAML run config with every path made absolute.

    The launched processes read it with ``--config``, so they train with
    exactly what the notebook resolved, whatever their working directory.
    """
    params = dict(cfg.params, workdir=str(cfg.workdir))
    for name in ("base_model", "dataset_prefix"):
        params[name] = str(cfg.path(name))
    for name in ("deepspeed_config", "hostfile"):
        p = optional_path(cfg, name)
        params[name] = str(p) if p else ""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, yaml.safe_dump(params, sort_keys=True, allow_unicode=True))
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ================================================================ validation

def _positive(cfg: config.Config) -> None:
    for name in ("micro_batch", "grad_accum", "seq_len", "save_steps", "num_nodes", "num_gpus"):
        if cfg.params[name] < 1:
            raise PretrainError(f"{name} must be >= 1, got {cfg.params[name]}")
    if cfg.seq_len < 2:
        raise PretrainError(f"seq_len must be >= 2 to predict a next token, got {cfg.seq_len}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise PretrainError(f"max_steps must be >= 1 (or -1 for one epoch), got {cfg.max_steps}")
    if cfg.warmup_steps < 0:
        raise PretrainError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not cfg.learning_rate > 0:
        raise PretrainError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if not 0 <= cfg.weight_decay < 1:
        raise PretrainError(f"weight_decay must be in [0, 1), got {cfg.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= cfg.params[name] < 1:
            raise PretrainError(f"{name} must be in [0, 1), got {cfg.params[name]}")
    if cfg.stop_at_step < 0 or (cfg.max_steps > 0 and cfg.stop_at_step >= cfg.max_steps):
        raise PretrainError(f"stop_at_step must be 0 (never stop) or below max_steps "
                            f"{cfg.max_steps}, got {cfg.stop_at_step}")
    if cfg.launcher not in LAUNCHERS:
        raise PretrainError(f"launcher must be one of {LAUNCHERS}, got {cfg.launcher!r}")
    if cfg.precision not in PRECISIONS:
        raise PretrainError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    from transformers.trainer_utils import SchedulerType
    try:
        SchedulerType(cfg.lr_scheduler)
    except ValueError:
        raise PretrainError(f"lr_scheduler {cfg.lr_scheduler!r} is not a transformers "
                            f"scheduler; e.g. cosine, linear, constant_with_warmup") from None


def check_precision(precision: str, cuda: bool | None = None) -> None:
    """fp32 runs anywhere; fp16 / bf16 need a GPU here (and bf16 an Ampere or newer one)."""
    if precision not in PRECISIONS:
        raise PretrainError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    if precision != "fp32" and not cuda:
        raise PretrainError(f"precision {precision} needs a GPU; on CPU use precision fp32")


def check_model(model_dir: Path, seq_len: int) -> dict:
    """The base model exists and has room for ``seq_len`` positions."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PretrainError(f"base model not found: {model_dir} has no config.json "
                            "(run notebook 00, or set base_model to a Hugging Face model folder)")
    mcfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    positions = getattr(mcfg, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise PretrainError(f"seq_len {seq_len} is above the model's {positions} positions "
                            f"(max_position_embeddings of {model_dir}); use seq_len <= {positions}")
    return {"model_type": mcfg.model_type, "max_position_embeddings": positions,
            "vocab_size": mcfg.vocab_size}


def check_dataset(prefix: Path, seq_len: int, vocab_size: int | None = None,
                  probe: int = 2000) -> dict:
    """Notebook 01's dataset exists (``PREFIX.bin`` + ``PREFIX.idx``), reads,
    is not empty, its samples fit ``seq_len``, and its first ``probe`` samples
    use token ids the model has."""
    from . import indexed_dataset

    prefix = Path(prefix)
    if not indexed_dataset.exists(prefix):
        missing = [str(p) for p in indexed_dataset.paths(prefix) if not p.is_file()]
        raise PretrainError(f"dataset not found: {' and '.join(missing)} missing (run notebook "
                            "01, or python -m knowlm_nb.corpus prepare, or set dataset_prefix)")
    try:
        ds = indexed_dataset.IndexedDataset(prefix)
    except indexed_dataset.IndexedDatasetError as exc:
        raise PretrainError(f"dataset {prefix} cannot be read: {exc}") from None
    if len(ds) == 0:
        raise PretrainError(f"dataset {prefix} has no samples")
    longest = int(ds.sizes.max())
    if longest > seq_len:
        raise PretrainError(f"dataset {prefix} has samples of {longest} tokens, longer than "
                            f"seq_len {seq_len}; raise seq_len or rebuild it with max_len <= {seq_len}")
    top = max(int(ds[i].max()) for i in range(min(len(ds), probe)) if ds.sizes[i])
    if vocab_size is not None and top >= vocab_size:
        raise PretrainError(f"dataset {prefix} has token id {top} but the model's vocabulary has "
                            f"{vocab_size} tokens: it was made with another tokenizer")
    return {"samples": len(ds), "tokens": int(ds.num_tokens), "longest": longest}


def read_deepspeed_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PretrainError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(ds, dict):
        raise PretrainError(f"{path}: a DeepSpeed config must be a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise PretrainError(f"{path}: zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def check_deepspeed_config(path: Path, micro_batch: int, grad_accum: int, world: int,
                           precision: str = "fp32") -> dict:
    """The DeepSpeed config agrees with the run's batch sizes and precision.

    DeepSpeed insists on ``train_batch_size = micro batch x accumulation x
    processes``; the Trainer fills ``"auto"`` values, and a number that
    disagrees is an error here, before anything is launched.
    """
    ds = read_deepspeed_config(path)
    want = {"train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world}
    wrong = [f"{key} is {ds[key]!r} but the run has {value}" for key, value in want.items()
             if key in ds and ds[key] != "auto" and ds[key] != value]
    if wrong:
        raise PretrainError(
            f"{path}: batch sizes disagree with the arguments: {'; '.join(wrong)} "
            f"(micro_batch {micro_batch} x grad_accum {grad_accum} x {world} processes = "
            f"{want['train_batch_size']}); set them to \"auto\" or to these numbers")
    for mode in ("fp16", "bf16"):
        enabled = ds.get(mode, {}).get("enabled", False)
        if enabled is True and precision != mode:
            raise PretrainError(f"{path}: {mode}.enabled is true but precision is {precision}; "
                                f"set it to \"auto\" or use precision {mode}")
    return {"zero_stage": ds["zero_optimization"]["stage"],
            "offload": sorted(k for k in ("offload_optimizer", "offload_param")
                              if k in ds["zero_optimization"])}


def check_inputs(cfg: config.Config, cuda: bool | None = None) -> dict:
    """Check everything a run needs before launching it; return what was found.

    Raises :class:`PretrainError` naming the first problem: a bad number, a
    missing base model or dataset, ``seq_len`` above the model's positions, a
    DeepSpeed config that disagrees with the batch sizes, a malformed hostfile.
    """
    _positive(cfg)
    check_precision(cfg.precision, cuda)
    info = check_model(cfg.path("base_model"), cfg.seq_len)
    info["dataset"] = check_dataset(cfg.path("dataset_prefix"), cfg.seq_len, info["vocab_size"])
    ds_path = optional_path(cfg, "deepspeed_config")
    info["deepspeed"] = (check_deepspeed_config(ds_path, cfg.micro_batch, cfg.grad_accum,
                                                world_size(cfg), cfg.precision)
                         if ds_path else None)
    hostfile = optional_path(cfg, "hostfile")
    if hostfile:
        info["hosts"] = check_capacity(parse_hostfile(hostfile), cfg.num_nodes, cfg.num_gpus, hostfile)
    elif cfg.num_nodes > 1:
        raise PretrainError(f"num_nodes {cfg.num_nodes} needs a hostfile naming the nodes")
    info["world_size"] = world_size(cfg)
    info["global_batch"] = cfg.micro_batch * cfg.grad_accum * world_size(cfg)
    info["tokens_per_step"] = info["global_batch"] * cfg.seq_len
    return info


# ================================================================== hostfile

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """``{host: slots}`` from a DeepSpeed hostfile, in file order.

    One node per line, ``HOSTNAME slots=N``; ``#`` comments and blank lines are
    skipped. Anything else is an error naming ``file:line`` and what is wrong.
    What this accepts, DeepSpeed's launcher reads the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"hostfile not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PretrainError(f"{path}: not a text file (invalid UTF-8)") from None
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise PretrainError(f"{where}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        host, slots = parts
        if not _HOST.fullmatch(host):
            raise PretrainError(f"{where}: {host!r} is not a valid host name")
        m = re.fullmatch(r"slots=(\d+)", slots)
        if not m:
            raise PretrainError(f"{where}: expected slots=N (N GPUs on {host}), got {slots!r}")
        if int(m.group(1)) < 1:
            raise PretrainError(f"{where}: {host} has slots=0; a node needs at least one slot")
        if host in hosts:
            raise PretrainError(f"{where}: host {host} is listed twice")
        hosts[host] = int(m.group(1))
    if not hosts:
        raise PretrainError(f"{path}: no 'HOSTNAME slots=N' line; the hostfile lists no node")
    return hosts


def check_capacity(hosts: Mapping[str, int], num_nodes: int, num_gpus: int,
                   where: str | Path = "hostfile") -> dict[str, int]:
    """The first ``num_nodes`` hosts, each with at least ``num_gpus`` slots."""
    if num_nodes > len(hosts):
        raise PretrainError(f"{where}: num_nodes {num_nodes} but the hostfile lists "
                            f"{len(hosts)} node(s): {', '.join(hosts)}")
    used = dict(list(hosts.items())[:num_nodes])
    short = {h: s for h, s in used.items() if s < num_gpus}
    if short:
        raise PretrainError(f"{where}: num_gpus {num_gpus} per node but "
                            + ", ".join(f"{h} has slots={s}" for h, s in short.items()))
    return used


# ================================================================== launcher

def _tool(name: str) -> str:
    """The venv's copy of a console script (``deepspeed``, ``torchrun``) if present."""
    local = Path(sys.executable).with_name(name)
    if local.is_file():
        return str(local)
    return shutil.which(name) or name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script_args: Iterable[str] = (), launcher: str = "deepspeed",
                   num_nodes: int = 1, num_gpus: int = 2, hostfile: str | Path | None = None,
                   master_addr: str | None = None, master_port: int | None = None,
                   module: str = MODULE) -> list[str]:
    """The argv that launches ``module`` on ``num_nodes`` x ``num_gpus`` processes.

    * ``deepspeed``: ``deepspeed [--hostfile H] --num_nodes N --num_gpus G
      [--master_addr A] --master_port P --module MODULE ARGS``. With a hostfile
      it is run once, on the first node, which starts the others over ssh.
    * ``torchrun``: one node ``--standalone``; several nodes use c10d
      rendezvous at the first host, and the same command runs on every node.

    ``master_port`` defaults to a free local port on one node and 29500
    across nodes.
    """
    script_args = [str(a) for a in script_args]
    if launcher not in LAUNCHERS:
        raise PretrainError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    for name, value in (("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PretrainError(f"{name} must be a positive int, got {value!r}")
    hosts = None
    if hostfile:
        hosts = check_capacity(parse_hostfile(hostfile), num_nodes, num_gpus, hostfile)
        master_addr = master_addr or next(iter(hosts))
    elif num_nodes > 1:
        raise PretrainError(f"num_nodes {num_nodes} needs a hostfile naming the nodes")
    if master_port is None:
        master_port = 29500 if hosts else free_port()
    if launcher == "deepspeed":
        argv = [_tool("deepspeed")]
        if hostfile:
            argv += ["--hostfile", str(hostfile)]
        argv += ["--num_nodes", str(num_nodes), "--num_gpus", str(num_gpus)]
        if master_addr:
            argv += ["--master_addr", master_addr]
        argv += ["--master_port", str(master_port), "--module", module]
    elif hosts:
        argv = [_tool("torchrun"), "--nnodes", str(num_nodes), "--nproc_per_node", str(num_gpus),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}",
                "--rdzv_id", "knowlm-pretrain", "-m", module]
    else:
        argv = [_tool("torchrun"), "--standalone", "--nproc_per_node", str(num_gpus),
                "-m", module]
    return argv + script_args


def single_process_command(script_args: Iterable[str] = (), module: str = MODULE) -> list[str]:
    """Plain ``python -m MODULE ARGS``: one process, no launcher."""
    return [sys.executable, "-m", module, *[str(a) for a in script_args]]


def command_for(cfg: config.Config, run_config: Path, output_dir: Path,
                resume: str = "auto", master_port: int | None = None) -> list[str]:
    """The launch argv for a run config written by :func:`write_run_config`.
    A plain Trainer (no DeepSpeed config) on one process needs no launcher."""
    args = ["--config", str(run_config), "--output_dir", str(output_dir), "--resume", resume]
    if world_size(cfg) == 1 and not cfg.deepspeed_config:
        return single_process_command(args)
    return launch_command(args, cfg.launcher, cfg.num_nodes, cfg.num_gpus,
                          optional_path(cfg, "hostfile"), master_port=master_port)


def job_env(threads_per_process: int = 1, extra: Mapping[str, str] | None = None) -> dict:
    """Environment for the launched processes: one BLAS thread each (2 cores, 2 ranks)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads_per_process), "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)})
    env.update(extra or {})
    return env


def shell_form(argv: list[str]) -> str:
    """How ``argv`` reads in a terminal (for display only; jobs run the list)."""
    return shlex.join(argv)


# ======================================================================= jobs

@dataclass
class JobResult:
    argv: list[str]
    returncode: int | None
    stopped: bool                    # we stopped it (SIGTERM / SIGKILL) after stop_at_step
    killed: bool                     # it needed SIGKILL
    seconds: float
    events: list[dict] = field(default_factory=list)   # parsed "[knowlm] {...}" lines
    tail: list[str] = field(default_factory=list)      # last lines of output

    @property
    def ok(self) -> bool:
        return self.returncode == 0 or self.stopped

    def last_step(self) -> int:
        return max((e["step"] for e in self.events if e.get("event") == "step"), default=0)


def parse_event(line: str) -> dict | None:
    """The JSON of a ``[knowlm] {...}`` log line, else None."""
    i = line.find(LOG_PREFIX)
    if i < 0:
        return None
    try:
        event = json.loads(line[i + len(LOG_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def describe(event: Mapping) -> str:
    """One readable line for a run event."""
    kind = event.get("event")
    if kind == "step":
        return (f"step {event['step']:>4}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
                f"tokens {event['tokens']:>9,}  {event['seconds']:6.1f} s")
    if kind == "checkpoint":
        return f"checkpoint-{event['step']} written (every rank done)"
    if kind == "start":
        zero = f"ZeRO-{event['zero_stage']}" if event.get("zero_stage") is not None else "no DeepSpeed"
        resumed = (f", resuming from step {event['resumed_from']}" if event.get("resumed_from")
                   else "")
        return (f"started: {event['world_size']} process(es) over {event['backend']}, {zero}, "
                f"{event['precision']}, global batch {event['global_batch']} "
                f"({event['tokens_per_step']:,} token positions a step){resumed}")
    if kind == "done":
        losses = ", ".join(f"{k} {v:.3f}" for k, v in event["heldout_loss"].items())
        return f"done at step {event['global_step']}: held-out loss {losses}"
    return json.dumps(dict(event))


def show_line(line: str) -> None:
    """Print a line worth seeing: run events readably, errors and the launcher's
    own commands as they are; the rest stays in ``launcher.log``."""
    event = parse_event(line)
    if event:
        print(describe(event), flush=True)
    elif any(k in line for k in ("Error", "error:", "Traceback", "cmd = ", "spawned with command",
                                 "Killed", "exits with return code")):
        print(line, flush=True)


class Job:
    """A launched run: start it, stream its log, optionally stop it after a step.

    The command runs in a new session (its own process group), so stopping it
    reaches the launcher and every rank: SIGTERM first, then SIGKILL for what
    is still alive after ``grace`` seconds.
    """

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None,
                 log_path: Path | None = None, cwd: Path = ROOT):
        self.argv, self.env, self.cwd = list(argv), dict(env or job_env()), cwd
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Job":
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1,
                                     start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        try:
            for line in self.proc.stdout:
                if log:
                    log.write(line)
                    log.flush()
                self._lines.put(line.rstrip("\n"))
        finally:
            if log:
                log.close()
            self._lines.put(None)

    def stop(self, grace: float = 30.0) -> bool:
        """SIGTERM the job's process group; SIGKILL what is left after ``grace``
        seconds. Returns True when SIGKILL was needed."""
        import psutil

        if self.proc.poll() is not None:
            return False
        try:  # the ranks, found before the launcher exits and orphans them
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        os.killpg(self.proc.pid, signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            killed = True
        _, alive = psutil.wait_procs(family, timeout=5 if killed else grace)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        return killed or bool(alive)

    def watch(self, stop_at_step: int = 0, timeout: float | None = None,
              show: Callable[[str], None] | None = show_line) -> JobResult:
        """Stream the output until the job ends, or until step ``stop_at_step``
        is logged and the job is stopped. ``show`` gets every line."""
        events, tail, stopped, killed = [], [], False, False
        deadline = time.time() + timeout if timeout else None
        while True:
            remaining = None if deadline is None else deadline - time.time()
            if remaining is not None and remaining <= 0:
                killed = self.stop()
                tail.append(f"[job] timed out after {timeout:.0f} s and was stopped")
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                break
            tail = (tail + [line])[-60:]
            event = parse_event(line)
            if event:
                events.append(event)
            if show:
                show(line)
            if (stop_at_step and event and event.get("event") == "step"
                    and event["step"] >= stop_at_step):
                if show:
                    show(f"[job] step {event['step']} reached: stopping the run "
                         "(SIGTERM, then SIGKILL if needed)")
                killed = self.stop()
                stopped = True
                break
        self.proc.wait()
        return JobResult(self.argv, self.proc.returncode, stopped, killed,
                         time.time() - self.t0, events, tail)


def run_job(argv: list[str], env: Mapping[str, str] | None = None, stop_at_step: int = 0,
            timeout: float | None = 1800, show: Callable[[str], None] | None = show_line,
            log_path: Path | None = None) -> JobResult:
    """Start ``argv``, stream it, stop it after ``stop_at_step`` (0: let it end)."""
    return Job(argv, env, log_path).start().watch(stop_at_step, timeout, show)


def launch(cfg: config.Config, output_dir: Path, resume: str = "auto", stop_at_step: int = 0,
           fresh: bool = False, show: Callable[[str], None] | None = show_line,
           timeout: float | None = 1800, threads_per_process: int = 1) -> JobResult:
    """Write the run config, build the launch command and run it, streaming.

    ``fresh=True`` empties ``output_dir`` first. A failed run (not one we
    stopped) raises :class:`PretrainError` with the end of its log.
    """
    check_inputs(cfg)  # fail here, with a clear message, not in every rank
    output_dir = Path(output_dir)
    if fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(cfg, output_dir / "run.yaml")
    argv = command_for(cfg, run_config, output_dir, resume)
    if show:
        print("$ " + shell_form(argv), flush=True)
    result = run_job(argv, job_env(threads_per_process), stop_at_step, timeout, show,
                     output_dir / "launcher.log")
    if not result.ok:
        raise PretrainError(f"the run failed (exit code {result.returncode}); the end of its "
                            "log:\n" + "\n".join(result.tail[-25:]))
    return result


# ================================================================== the run

def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` in ``output_dir`` (every rank
    finished writing it), or None. A checkpoint cut short by a kill is skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    done = [p for p in output_dir.glob("checkpoint-*")
            if re.fullmatch(r"checkpoint-\d+", p.name) and (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def read_log(output_dir: Path) -> list[dict]:
    """Every step the run logged, across launches (``run`` tells them apart)."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_result(output_dir: Path) -> dict:
    path = Path(output_dir) / RESULT_FILE
    if not path.is_file():
        raise PretrainError(f"no {RESULT_FILE} in {output_dir}: the run did not finish")
    return json.loads(path.read_text(encoding="utf-8"))


def heldout_texts(lang: str) -> list[str]:
    """The held-out sentences of one language (deduplicated, in file order)."""
    if lang not in HELDOUT:
        raise PretrainError(f"no held-out text for {lang!r}; have {sorted(HELDOUT)}")
    path = ROOT / HELDOUT[lang]
    seen: dict[str, None] = {}
    for lineno, rec in tiny.iter_jsonl(path):
        text = rec.get("input") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise PretrainError(f"{path}:{lineno}: no string 'input' field")
        if text.strip():
            seen.setdefault(text, None)
    return list(seen)


def heldout_losses(model, tokenizer, max_len: int) -> dict[str, float]:
    """Mean next-token loss (nats/token) on the held-out text of each language."""
    return {lang: tiny.mean_loss(model, tokenizer, heldout_texts(lang), max_len=max_len)
            for lang in HELDOUT}


def perplexities(losses: Mapping[str, float]) -> dict[str, float]:
    return {k: math.exp(v) for k, v in losses.items()}


def _callback_class():
    from transformers import TrainerCallback

    class RunLog(TrainerCallback):
        """Logs every step to log.jsonl and stdout; marks complete checkpoints."""

        def __init__(self, output_dir: Path, tokens_per_step: int, resumed_from: int):
            self.output_dir, self.tokens_per_step = output_dir, tokens_per_step
            self.resumed_from, self.run = resumed_from, time.strftime("%Y%m%d-%H%M%S")

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                control.should_save = True  # always checkpoint the last step
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            rec = {"event": "step", "run": self.run, "resumed_from": self.resumed_from,
                   "step": state.global_step, "loss": round(float(logs["loss"]), 6),
                   "lr": float(logs.get("learning_rate", 0.0)),
                   "grad_norm": float(logs.get("grad_norm", float("nan"))),
                   "tokens": int(state.num_input_tokens_seen),  # real tokens, padding not counted
                   "positions": state.global_step * self.tokens_per_step,
                   "seconds": round(time.time() - self.t0, 3), "wall": time.time()}
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(LOG_PREFIX + json.dumps(rec), flush=True)

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its shard
            if state.is_world_process_zero:
                ckpt = self.output_dir / f"checkpoint-{state.global_step}"
                (ckpt / COMPLETE_MARKER).write_text(json.dumps(
                    {"step": state.global_step, "world_size": args.world_size}), encoding="utf-8")
                print(LOG_PREFIX + json.dumps({"event": "checkpoint", "step": state.global_step,
                                               "path": str(ckpt)}), flush=True)

    return RunLog


def train(cfg: config.Config, output_dir: Path, resume: str = "auto") -> dict:
    """Train in this process, one rank of the launched job (or the only process).

    ``resume``: ``auto`` (the last complete checkpoint in ``output_dir``, if
    any), ``never`` (refuse to start over an existing run), or a checkpoint path.
    """
    import torch

    output_dir = Path(output_dir)
    cuda = torch.cuda.is_available()
    info = check_inputs(cfg, cuda)
    ds_path = optional_path(cfg, "deepspeed_config")
    if ds_path:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState
    # the accelerate state before TrainingArguments: on CPU, DeepSpeed over
    # gloo only works this way (with use_configured_state below)
    launched = "WORLD_SIZE" in os.environ  # set by deepspeed / torchrun, not by plain python
    state = PartialState(backend="gloo" if launched and not cuda else None)
    if state.num_processes != world_size(cfg):
        raise PretrainError(f"launched with {state.num_processes} processes but num_nodes "
                            f"{cfg.num_nodes} x num_gpus {cfg.num_gpus} = {world_size(cfg)}")

    checkpoint = None
    if resume == "auto":
        checkpoint = last_checkpoint(output_dir)
    elif resume == "never":
        if last_checkpoint(output_dir):
            raise PretrainError(f"{output_dir} already holds checkpoints; resume them "
                                "(--resume auto) or use another output_dir")
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise PretrainError(f"not a checkpoint to resume from: {checkpoint} "
                                "(no trainer_state.json)")
    resumed_from = int(checkpoint.name.split("-")[-1]) if checkpoint else 0

    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from .indexed_dataset import SampleDataset

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
    args = TrainingArguments(
        output_dir=str(output_dir), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.micro_batch, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps, num_train_epochs=1,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, max_grad_norm=1.0,
        optim="adamw_torch", fp16=cfg.precision == "fp16", bf16=cfg.precision == "bf16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=3,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding",
        deepspeed=str(ds_path) if ds_path else None,
        accelerator_config={"use_configured_state": True})
    # after TrainingArguments: with ZeRO-3, from_pretrained then loads each
    # rank's shard only (deepspeed.zero.Init), which a 13B model needs
    from . import preflight  # a wrong local path: the project's 'not found'
    base = preflight.require(cfg.path("base_model"), "model", "base_model")
    tokenizer = AutoTokenizer.from_pretrained(preflight.require(base, "tokenizer", "base_model"),
                                              local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = SampleDataset(str(cfg.path("dataset_prefix")), cfg.seq_len, pad_id)
    callback = _callback_class()(output_dir, info["tokens_per_step"], resumed_from)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[callback])  # checkpoints then carry the tokenizer too
    if state.is_main_process:
        print(LOG_PREFIX + json.dumps({
            "event": "start", "world_size": state.num_processes, "backend": state.backend,
            "zero_stage": (info["deepspeed"] or {}).get("zero_stage"), "precision": cfg.precision,
            "global_batch": info["global_batch"], "tokens_per_step": info["tokens_per_step"],
            "max_steps": cfg.max_steps, "resumed_from": resumed_from}), flush=True)
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.time() - t0
    # every rank runs the same forwards: under ZeRO-3 each one gathers the
    # layers' shards from all ranks, so no rank may skip them
    losses = heldout_losses(trainer.model, tokenizer, cfg.seq_len)
    result = {"global_step": trainer.state.global_step, "resumed_from": resumed_from,
              "train_loss": out.training_loss, "heldout_loss": losses,
              "heldout_perplexity": perplexities(losses), "train_seconds": seconds,
              "world_size": state.num_processes, "zero_stage": (info["deepspeed"] or {}).get("zero_stage"),
              "precision": cfg.precision, "tokens_per_step": info["tokens_per_step"]}
    if state.is_main_process:
        _atomic_write_text(output_dir / RESULT_FILE, json.dumps(result, indent=2))
        print(LOG_PREFIX + json.dumps({"event": "done", **result}), flush=True)
    state.wait_for_everyone()
    return result


# ============================================================ consolidation

def consolidate(checkpoint: Path, out_dir: Path, tokenizer_dir: Path | None = None,
                dtype: str = "fp32", max_shard_size: str = "5GB") -> Path:
    """Turn a ZeRO-2/3 checkpoint into one Hugging Face safetensors model.

    Each rank saved only its shard of the fp32 master weights; DeepSpeed's
    ``zero_to_fp32`` gathers them (shard by shard, lazily) into
    ``model.safetensors`` (or several shards with an index). The folder also
    gets the model config and the tokenizer (from ``tokenizer_dir``, default
    the checkpoint, which the Trainer saved it into), so it loads on its own. It is
    written beside ``out_dir`` and moved into place only when complete.
    """
    import torch

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "config.json").is_file():
        raise PretrainError(f"not a checkpoint: {checkpoint} has no config.json")
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise PretrainError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    with tiny.atomic_dir(out_dir) as tmp:
        if (checkpoint / "latest").is_file():  # a DeepSpeed (ZeRO) checkpoint
            from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict
            convert_zero_checkpoint_to_state_dict(str(checkpoint), str(tmp), dtype=torch_dtype,
                                                  max_shard_size=max_shard_size,
                                                  safe_serialization=True)
            source = "zero"
        else:  # a plain Trainer checkpoint already holds the whole model
            files = sorted(checkpoint.glob("model*.safetensors*"))
            if not files:
                raise PretrainError(f"{checkpoint}: neither a ZeRO checkpoint ('latest') "
                                    "nor model*.safetensors")
            for f in files:
                shutil.copy2(f, tmp / f.name)
            source = "trainer"
        for name in ("config.json", "generation_config.json"):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        if dtype != "fp32":
            mcfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            mcfg["dtype"] = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
            (tmp / "config.json").write_text(json.dumps(mcfg, indent=2), encoding="utf-8")
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else checkpoint
        if (tokenizer_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(tmp)
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")) \
            if (checkpoint / "trainer_state.json").is_file() else {}
        manifest = {"source_checkpoint": str(checkpoint), "source": source,
                    "global_step": state.get("global_step"), "dtype": dtype,
                    "weights_sha256": tiny.weights_hash(tmp)}
        (tmp / "consolidated.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out_dir


def evaluate(model_dir: Path, max_len: int) -> dict[str, float]:
    """Held-out losses of a saved model folder, in this (single) process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PretrainError(f"no model in {model_dir} (no config.json)")
    from . import preflight  # a wrong local path: the project's 'not found'
    tokenizer = AutoTokenizer.from_pretrained(
        preflight.require(model_dir, "tokenizer"), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        preflight.require(model_dir, "model"), local_files_only=True)
    return heldout_losses(model, tokenizer, max_len)


def evaluate_in_fresh_process(model_dir: Path, max_len: int, timeout: float = 600) -> dict:
    """:func:`evaluate` in a new Python process: nothing of this one is reused."""
    argv = single_process_command(["--evaluate", str(model_dir), "--seq_len", str(max_len)])
    proc = subprocess.run(argv, env=job_env(threads_per_process=os.cpu_count() or 1), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e]
    if proc.returncode != 0 or not events:
        raise PretrainError(f"evaluation of {model_dir} failed:\n{proc.stderr[-2000:]}")
    return events[-1]["heldout_loss"]


# ============================================================== upstream

def ensure_inputs(cfg: config.Config, show: Callable[[str], None] = print) -> dict:
    """Build what notebooks 00 and 01 would have written, if it is missing.

    Only artifacts left at their default ("" = from ``workdir``) are built, at
    tiny scale, saying so; an explicit path that does not exist stays an error
    for :func:`check_inputs`.
    """
    built = {}
    base = cfg.path("base_model")
    if not cfg.base_model and not (base / "config.json").is_file():
        p00 = config.notebook_params(config.BASE_PROFILE, "00")
        show(f"notebook 00's base model is missing: building it at tiny scale in {base.parent} "
             "(tiny.build_zoo)")
        tiny.build_zoo(base.parent, verbose=False, **tiny.zoo_settings(p00))
        built["base_model"] = str(base)
    prefix = cfg.path("dataset_prefix")
    from . import indexed_dataset
    if not cfg.dataset_prefix and not indexed_dataset.exists(prefix):
        from . import corpus
        p01 = config.notebook_params(config.BASE_PROFILE, "01")
        tok_dir = cfg.workdir / config.ARTIFACTS["00"]["tokenizer"]
        if not (tok_dir / "tokenizer.json").is_file():
            tok_dir = base  # a base model folder carries its tokenizer
        show(f"notebook 01's dataset is missing: building it at tiny scale at {prefix} "
             "(corpus.prepare)")
        corpus.prepare([str(ROOT / p01["corpus_glob"])], str(tok_dir), p01["max_len"],
                       str(prefix), num_proc=1, min_len=p01["min_len"], progress=False)
        built["dataset_prefix"] = str(prefix)
    return built


# ================================================================= sizing

def model_size(shape: Mapping | None = None) -> tuple[int, int]:
    """(parameters, parameters of the largest layer) of a Llama of ``shape``.

    The model is built on the meta device (no memory). DeepSpeed's own
    ``model_to_params`` cannot be used on it: it tells shared parameters apart
    by storage address, and every meta tensor has address 0.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA_13B)))
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def zero_memory(total_params: int, largest_layer_params: int, num_nodes: int,
                gpus_per_node: int, gpu_memory_gib: float) -> list[dict]:
    """DeepSpeed's estimates of model-state memory (params, grads, Adam) per
    GPU and per node's CPU RAM, in GiB, for ZeRO-2 / ZeRO-3 with and without
    offload. Model states only: activations come on top (see
    :func:`activation_memory`). Without offload, the CPU figure is what each
    node needs while the processes load the model.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    kw = dict(num_gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    rows = []
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, cpu_offload=offload, **kw)
        rows.append({"setup": "ZeRO-2" + (" + offload optimizer" if offload else ""),
                     "gpu_gib": gpu / GIB, "cpu_gib_per_node": cpu / GIB})
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, cpu_offload=offload,
            cpu_offload_params=offload_params, **kw)
        name = "ZeRO-3" + ("" if not offload else " + offload optimizer" if not offload_params
                           else " + offload optimizer and params")
        rows.append({"setup": name, "gpu_gib": gpu / GIB, "cpu_gib_per_node": cpu / GIB})
    for row in rows:
        row["fits_gpu"] = row["gpu_gib"] < gpu_memory_gib
        row["left_for_activations_gib"] = gpu_memory_gib - row["gpu_gib"]
    return rows


def activation_memory(micro_batch: int, seq_len: int, hidden: int, layers: int,
                      bytes_per_value: int = 2) -> float:
    """GiB per GPU kept by gradient checkpointing: each layer's input, one
    ``micro_batch x seq_len x hidden`` tensor in fp16 (the recompute
    working set of one layer comes on top)."""
    return micro_batch * seq_len * hidden * layers * bytes_per_value / GIB


def batch_arithmetic(micro_batch: int, grad_accum: int, gpus: int, seq_len: int) -> dict:
    """Global batch = micro batch x accumulation x GPUs; tokens per step."""
    global_batch = micro_batch * grad_accum * gpus
    return {"micro_batch": micro_batch, "grad_accum": grad_accum, "gpus": gpus,
            "global_batch": global_batch, "tokens_per_step": global_batch * seq_len}


def throughput(tokens_per_step: int, seconds_per_step: float, gpus: int) -> dict:
    tps = tokens_per_step / seconds_per_step
    return {"tokens_per_second": tps, "tokens_per_second_per_gpu": tps / gpus,
            "tokens_per_day": tps * 86400}


def mfu(params: int, tokens_per_second_per_gpu: float, peak_tflops: float,
        layers: int, hidden: int, seq_len: int) -> dict:
    """Model FLOPs utilisation: training costs about 6 FLOPs per parameter per
    token (forward 2, backward 4) plus attention's 12 x layers x hidden x
    seq_len; recomputing activations (gradient checkpointing) spends a further
    forward (2N) that does not count as model FLOPs but does as hardware FLOPs."""
    per_token = 6 * params + 12 * layers * hidden * seq_len
    achieved = per_token * tokens_per_second_per_gpu
    hardware = (per_token + 2 * params) * tokens_per_second_per_gpu
    return {"flops_per_token": per_token, "achieved_tflops_per_gpu": achieved / 1e12,
            "mfu": achieved / (peak_tflops * 1e12), "hfu_with_recompute": hardware / (peak_tflops * 1e12)}


def size_real_run(run: Mapping | None = None, shape: Mapping | None = None,
                  peak_tflops: float = V100_PEAK_TFLOPS) -> dict:
    """KnowLM's 13B run, sized: memory per setup, batch, throughput, MFU."""
    run = {**KNOWLM_RUN, **(run or {})}
    shape = {**LLAMA_13B, **(shape or {})}
    total, largest = model_size(shape)
    gpus = run["num_nodes"] * run["gpus_per_node"]
    batch = batch_arithmetic(run["micro_batch"], run["grad_accum"], gpus, run["seq_len"])
    speed = throughput(batch["tokens_per_step"], run["seconds_per_step"], gpus)
    util = mfu(total, speed["tokens_per_second_per_gpu"], peak_tflops,
               shape["num_hidden_layers"], shape["hidden_size"], run["seq_len"])
    return {"parameters": total, "largest_layer_parameters": largest,
            "memory": zero_memory(total, largest, run["num_nodes"], run["gpus_per_node"],
                                  run["gpu_memory_gib"]),
            "activations_gib_checkpointed": activation_memory(
                run["micro_batch"], run["seq_len"], shape["hidden_size"], shape["num_hidden_layers"]),
            **batch, **speed, **util, "peak_tflops": peak_tflops, **{f"run_{k}": v for k, v in run.items()}}


# ================================================================== plots

def plot_loss(log: list[dict], ax=None, title: str = "Training loss"):
    """Loss per step, one line per launch: a resumed run continues the curve."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    runs: dict[str, list[dict]] = {}
    for rec in log:
        runs.setdefault(rec["run"], []).append(rec)
    for i, (run, recs) in enumerate(runs.items()):
        start = recs[0].get("resumed_from", 0)
        label = f"launch {i + 1}" + (f" (resumed from step {start})" if start else "")
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], marker=".", lw=1.2,
                label=label, ls="-" if i == 0 else "--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


# ================================================================= benchmark

def bench_main(argv: list[str]) -> dict:
    """Tokens/s of a single-process plain Trainer vs 2-process ZeRO-2 and ZeRO-3
    on CPU, same global batch and data, run one after the other; as ratios."""
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench pretrain")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq_len", type=int, default=256, help="at least notebook 01's max_len")
    ap.add_argument("--micro_batch", type=int, default=4)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench" / "pretrain"))
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    base = {"workdir": str(work), "max_steps": a.steps, "seq_len": a.seq_len,
            "micro_batch": a.micro_batch, "save_steps": a.steps, "stop_at_step": 0,
            "warmup_steps": 1}
    cfg0 = settings("tiny", overrides=base)
    ensure_inputs(cfg0, show=lambda s: print(s, file=sys.stderr))
    procs = cfg0.num_gpus
    setups = {
        "plain_1proc": dict(deepspeed_config="", num_gpus=1, grad_accum=cfg0.grad_accum * procs),
        "zero2_2proc": dict(deepspeed_config="env/deepspeed/zero2.json", num_gpus=procs),
        "zero3_2proc": dict(deepspeed_config="env/deepspeed/zero3.json", num_gpus=procs),
    }
    rows = {}
    for name, extra in setups.items():
        cfg = settings("tiny", overrides={**base, **extra})
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        argv_ = command_for(cfg, write_run_config(cfg, out / "run.yaml"), out, "never")
        threads = (os.cpu_count() or 1) // cfg.num_gpus  # every setup uses all the cores
        res = run_job(argv_, job_env(threads), show=None, log_path=out / "launcher.log")
        if res.returncode != 0:
            raise PretrainError(f"bench {name} failed:\n" + "\n".join(res.tail[-20:]))
        steps = read_log(out)  # time from the end of step 2: start-up and warm-up excluded
        seconds = steps[-1]["wall"] - steps[1]["wall"]
        tokens = steps[-1]["tokens"] - steps[1]["tokens"]
        rows[name] = {"tokens_per_s": tokens / seconds, "final_loss": steps[-1]["loss"],
                      "wall_s": res.seconds}
    ref = rows["plain_1proc"]["tokens_per_s"]
    return {"steps": a.steps, "seq_len": a.seq_len, "global_batch": a.micro_batch * cfg0.grad_accum * procs,
            "cores": os.cpu_count(), **{f"{k}_tokens_per_s": round(v["tokens_per_s"], 1) for k, v in rows.items()},
            **{f"{k}_vs_plain": round(v["tokens_per_s"] / ref, 3) for k, v in rows.items() if k != "plain_1proc"},
            "final_loss": {k: v["final_loss"] for k, v in rows.items()}}


# ======================================================================= CLI

def _cli_overrides(ns: argparse.Namespace) -> dict:
    out = {}
    for name in config.valid_keys(NOTEBOOK):
        raw = getattr(ns, name, None)
        if raw is None or name == "profile":
            continue
        expected = config.COMMON.get(name) or config.SCHEMA[NOTEBOOK][name]
        if expected is str:
            out[name] = raw
        else:
            try:
                out[name] = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise PretrainError(f"--{name} {raw!r}: not a valid value") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m knowlm_nb.pretrain",
        description="Continued pretraining with the HF Trainer + DeepSpeed ZeRO. This is "
                    "what `deepspeed` / `torchrun` start in every process; --launch starts "
                    "them for you.")
    ap.add_argument("--profile", help="env/profiles/NAME.yaml (default tiny)")
    ap.add_argument("--config", help="a YAML run config (e.g. the run.yaml notebook 02 writes)")
    for name in config.valid_keys(NOTEBOOK):
        if name != "profile":
            ap.add_argument(f"--{name}", metavar="VALUE", help=argparse.SUPPRESS)
    ap.add_argument("--output_dir", help="checkpoints and logs (default WORKDIR/02/run)")
    ap.add_argument("--resume", default="auto", help="auto (default) | never | CHECKPOINT")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("--launch", action="store_true", help="build the launch command and run it")
    ap.add_argument("--dry_run", action="store_true", help="print the launch command only")
    ap.add_argument("--consolidate", metavar="CHECKPOINT", help="ZeRO checkpoint -> HF model")
    ap.add_argument("--out", help="with --consolidate: the output folder")
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="print held-out losses of a model")
    ap.epilog = ("Parameters (--NAME VALUE): " + ", ".join(
        n for n in config.valid_keys(NOTEBOOK) if n != "profile"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(ns.local_rank))
    try:
        if ns.evaluate:
            max_len = int(ns.seq_len) if ns.seq_len else 256
            losses = evaluate(Path(ns.evaluate), max_len)
            print(LOG_PREFIX + json.dumps({"event": "evaluate", "heldout_loss": losses,
                                           "heldout_perplexity": perplexities(losses)}))
            return 0
        if ns.consolidate:
            if not ns.out:
                raise PretrainError("--consolidate needs --out DIR")
            out = consolidate(Path(ns.consolidate), Path(ns.out), tokenizer_dir=None)
            print(f"consolidated {ns.consolidate} -> {out}")
            return 0
        cfg = settings(ns.profile, ns.config, _cli_overrides(ns))
        output_dir = Path(ns.output_dir) if ns.output_dir else cfg.workdir / NOTEBOOK / "run"
        if ns.dry_run or ns.launch:
            if ns.dry_run:
                run_config = output_dir / "run.yaml"
                print(shell_form(command_for(cfg, run_config, output_dir, ns.resume, 29500)))
                return 0
            ensure_inputs(cfg)
            launch(cfg, output_dir, ns.resume, stop_at_step=cfg.stop_at_step)
            return 0
        train(cfg, output_dir, ns.resume)
        return 0
    except (PretrainError, config.ConfigError, tiny.ZooError) as exc:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
