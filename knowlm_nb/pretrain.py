"""Stage 02's training run: the entry point each launched process runs, input checks, `train`, consolidation.

KnowLM continued LLaMA-13B's pretraining on Chinese, English and code with the
Hugging Face Trainer plus DeepSpeed ZeRO-3 on 3 nodes x 8 V100-32GB. This
module is the same kind of run, for real, at any scale:

* **The entry point** ``python -m knowlm_nb.pretrain --profile NAME | --config
  FILE [--KEY VALUE ...]`` is what the ``deepspeed`` launcher or ``torchrun``
  starts in every process (it accepts ``--local_rank`` and ``LOCAL_RANK``). It
  trains a causal LM on notebook 01's indexed dataset (:func:`train`), logs
  every step to ``OUTPUT_DIR/log.jsonl``, checkpoints every ``save_steps`` (and
  at the last step), resumes from the last complete checkpoint, and ends by
  measuring the held-out loss per language into ``OUTPUT_DIR/result.json``.
* **Checks** (:func:`check_inputs`) name a bad number, a missing base model or
  dataset, a DeepSpeed config that disagrees with the batch, before anything
  is launched; :func:`ensure_inputs` builds notebooks 00/01's artifacts at tiny
  scale when they are missing.
* :func:`launch` writes the run config and starts the job with
  :mod:`knowlm_nb.launch` (hostfile, launcher argv, SIGTERM/SIGKILL job
  control); :mod:`knowlm_nb.sizing` holds the 13B estimates.
* **Consolidation** :func:`consolidate` turns a ZeRO checkpoint (each rank
  holds a shard) into one Hugging Face safetensors model, with DeepSpeed's own
  ``zero_to_fp32`` converter.

On CPU the processes talk over gloo. DeepSpeed then works with transformers 5
only when the accelerate state is made before ``TrainingArguments``
(:func:`distributed_state`, then :func:`training_arguments` with
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
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import yaml

from . import ROOT, config, files, tiny
from .launch import (LAUNCHERS, LaunchError, JobResult, check_capacity, emit_event, job_env,
                     launch_command, parse_event, parse_hostfile, run_job, shell_form, show_line,
                     single_process_command)

NOTEBOOK = "02"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
COMPLETE_MARKER = "knowlm_complete.json"
PRECISIONS = ("fp32", "fp16", "bf16")
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")

#: Held-out text for perplexity: the inputs of the IE evaluation split. They
#: are not in the pretraining corpus (data_samples/corpus), and none of their
#: names occurs anywhere in the training data (tests/test_data_samples.py).
HELDOUT = {"zh": "data_samples/ie/eval_zh.jsonl", "en": "data_samples/ie/eval_en.jsonl"}


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
    """Processes of the run: nodes x processes per node."""
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
    return files.write_text(Path(path), yaml.safe_dump(params, sort_keys=True, allow_unicode=True))


# ================================================================ validation

def _positive(cfg: config.Config) -> None:
    """Counts, rates and names in range; raises :class:`PretrainError` naming the first that is not."""
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
    """A DeepSpeed config file as a dict, with its ZeRO stage checked (0-3)."""
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
    DeepSpeed config that disagrees with the batch sizes, a malformed hostfile
    (:class:`~knowlm_nb.launch.LaunchError`'s message, as a :class:`PretrainError`).
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
        try:
            info["hosts"] = check_capacity(parse_hostfile(hostfile), cfg.num_nodes, cfg.num_gpus,
                                           hostfile)
        except LaunchError as exc:
            raise PretrainError(str(exc)) from None
    elif cfg.num_nodes > 1:
        raise PretrainError(f"num_nodes {cfg.num_nodes} needs a hostfile naming the nodes")
    info["world_size"] = world_size(cfg)
    info["global_batch"] = cfg.micro_batch * cfg.grad_accum * world_size(cfg)
    info["tokens_per_step"] = info["global_batch"] * cfg.seq_len
    return info


def command_for(cfg: config.Config, run_config: Path, output_dir: Path,
                resume: str = "auto", master_port: int | None = None) -> list[str]:
    """The launch argv for a run config written by :func:`write_run_config`.
    A plain Trainer (no DeepSpeed config) on one process needs no launcher."""
    args = ["--config", str(run_config), "--output_dir", str(output_dir), "--resume", resume]
    if world_size(cfg) == 1 and not cfg.deepspeed_config:
        return single_process_command(args)
    return launch_command(args, cfg.launcher, cfg.num_nodes, cfg.num_gpus,
                          optional_path(cfg, "hostfile"), master_port=master_port)


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
    """What the run measured at its end (``result.json``); an error if it did not finish."""
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
    for lineno, rec in files.iter_jsonl(path):
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
    """exp(loss) for each language."""
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
            emit_event(rec)

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its shard
            if state.is_world_process_zero:
                ckpt = self.output_dir / f"checkpoint-{state.global_step}"
                files.write_json(ckpt / COMPLETE_MARKER,
                                 {"step": state.global_step, "world_size": args.world_size})
                emit_event({"event": "checkpoint", "step": state.global_step, "path": str(ckpt)})

    return RunLog


def distributed_state(cfg: config.Config, cuda: bool):
    """The accelerate state of this process, made *before* ``TrainingArguments``.

    On CPU, DeepSpeed over gloo works with transformers 5 only this way: say
    DeepSpeed is in use, make the state with the gloo backend, and let
    :func:`training_arguments` tell the Trainer to use it as configured.
    """
    if optional_path(cfg, "deepspeed_config"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    launched = "WORLD_SIZE" in os.environ  # set by deepspeed / torchrun, not by plain python
    state = PartialState(backend="gloo" if launched and not cuda else None)
    if state.num_processes != world_size(cfg):
        raise PretrainError(f"launched with {state.num_processes} processes but num_nodes "
                            f"{cfg.num_nodes} x num_gpus {cfg.num_gpus} = {world_size(cfg)}")
    return state


def training_arguments(cfg: config.Config, output_dir: Path, cuda: bool):
    """The Trainer's arguments: KnowLM's AdamW and schedule, the DeepSpeed config, the configured state."""
    from transformers import TrainingArguments

    ds_path = optional_path(cfg, "deepspeed_config")
    return TrainingArguments(
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


def resume_point(output_dir: Path, resume: str = "auto") -> Path | None:
    """The checkpoint to resume from: ``auto`` (the last complete one, if any),
    ``never`` (none, and refuse to start over existing checkpoints), or a path."""
    if resume == "auto":
        return last_checkpoint(output_dir)
    if resume == "never":
        if last_checkpoint(output_dir):
            raise PretrainError(f"{output_dir} already holds checkpoints; resume them "
                                "(--resume auto) or use another output_dir")
        return None
    checkpoint = Path(resume)
    if not (checkpoint / "trainer_state.json").is_file():
        raise PretrainError(f"not a checkpoint to resume from: {checkpoint} "
                            "(no trainer_state.json)")
    return checkpoint


def train(cfg: config.Config, output_dir: Path, resume: str = "auto") -> dict:
    """Train in this process, one rank of the launched job (or the only process).

    ``resume``: see :func:`resume_point`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from .indexed_dataset import SampleDataset

    output_dir = Path(output_dir)
    cuda = torch.cuda.is_available()
    info = check_inputs(cfg, cuda)
    state = distributed_state(cfg, cuda)
    checkpoint = resume_point(output_dir, resume)
    resumed_from = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    args = training_arguments(cfg, output_dir, cuda)
    # after TrainingArguments: with ZeRO-3, from_pretrained then loads each
    # rank's shard only (deepspeed.zero.Init), which a 13B model needs
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
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
    zero_stage = (info["deepspeed"] or {}).get("zero_stage")
    if state.is_main_process:
        emit_event({"event": "start", "world_size": state.num_processes, "backend": state.backend,
                    "zero_stage": zero_stage, "precision": cfg.precision,
                    "global_batch": info["global_batch"], "tokens_per_step": info["tokens_per_step"],
                    "max_steps": cfg.max_steps, "resumed_from": resumed_from})
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.time() - t0
    # every rank runs the same forwards: under ZeRO-3 each one gathers the
    # layers' shards from all ranks, so no rank may skip them
    losses = heldout_losses(trainer.model, tokenizer, cfg.seq_len)
    result = {"global_step": trainer.state.global_step, "resumed_from": resumed_from,
              "train_loss": out.training_loss, "heldout_loss": losses,
              "heldout_perplexity": perplexities(losses), "train_seconds": seconds,
              "world_size": state.num_processes, "zero_stage": zero_stage,
              "precision": cfg.precision, "tokens_per_step": info["tokens_per_step"]}
    if state.is_main_process:
        files.write_json(output_dir / RESULT_FILE, result)
        emit_event({"event": "done", **result})
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
    with files.atomic_dir(out_dir) as tmp:
        if (checkpoint / "latest").is_file():  # a DeepSpeed (ZeRO) checkpoint
            from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict
            convert_zero_checkpoint_to_state_dict(str(checkpoint), str(tmp), dtype=torch_dtype,
                                                  max_shard_size=max_shard_size,
                                                  safe_serialization=True)
            source = "zero"
        else:  # a plain Trainer checkpoint already holds the whole model
            weights = sorted(checkpoint.glob("model*.safetensors*"))
            if not weights:
                raise PretrainError(f"{checkpoint}: neither a ZeRO checkpoint ('latest') "
                                    "nor model*.safetensors")
            for f in weights:
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
                    "weights_sha256": files.weights_hash(tmp)}
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
            emit_event({"event": "evaluate", "heldout_loss": losses,
                        "heldout_perplexity": perplexities(losses)})
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
    except (PretrainError, LaunchError, config.ConfigError, files.FilesError, tiny.ZooError) as exc:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
