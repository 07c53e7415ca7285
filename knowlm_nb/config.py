"""Profiles, parameters and paths.

A *profile* (``env/profiles/NAME.yaml``) holds the parameters of every notebook
for one kind of run: ``tiny`` (2 CPU cores, minutes), ``gpu`` (one CUDA GPU, a
real 7B model) and ``knowlm-13b`` (KnowLM's own settings). ``tiny`` is complete;
every other profile is layered on top of it and states only what differs.

The set of parameters a notebook accepts is declared once, here, in
:data:`SCHEMA`; each notebook's ``parameters`` cell declares exactly those names
(a test checks it), and a profile may only set names that appear there.

In a notebook::

    cfg = config.resolve("00", locals())     # right after the parameters cell
    cfg.vocab_size, cfg.workdir, cfg.path("tokenizer")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import ROOT

PROFILES_DIR = ROOT / "env" / "profiles"
BASE_PROFILE = "tiny"


class ConfigError(ValueError):
    """A profile or a parameter is wrong; the message says which and why."""


# Parameters every notebook takes.
COMMON = {
    "profile": str,   # which env/profiles/*.yaml to follow
    "workdir": str,   # where artifacts go; "" = runs/<profile>
    "seed": int,
}

# name -> type, per notebook. Paths given as "" mean "the artifact an earlier
# notebook wrote into workdir" (see ARTIFACTS); at real scale they point at
# local checkpoints and data.
SCHEMA: dict[str, dict[str, type | tuple]] = {
    "00": {
        "corpus_glob": str,
        "vocab_size": int,
        "min_frequency": int,
        "hidden_size": int,
        "num_layers": int,
        "num_heads": int,
        "num_kv_heads": int,
        "intermediate_size": int,
        "max_position": int,
        "sample_new_tokens": int,
    },
    "01": {
        "corpus_glob": str,
        "tokenizer_path": str,
        "max_len": int,
        "min_len": int,
        "num_proc": int,
    },
    "02": {
        "base_model": str,
        "dataset_prefix": str,
        "deepspeed_config": str,      # "" = plain Trainer, no DeepSpeed
        "launcher": str,              # deepspeed | torchrun
        "num_nodes": int,
        "num_gpus": int,              # processes per node (gloo ranks on CPU)
        "hostfile": str,              # "" = this machine only
        "micro_batch": int,
        "grad_accum": int,
        "seq_len": int,
        "max_steps": int,
        "learning_rate": float,
        "warmup_steps": int,
        "lr_scheduler": str,
        "weight_decay": float,
        "adam_beta1": float,
        "adam_beta2": float,
        "precision": str,             # fp32 | fp16 | bf16
        "gradient_checkpointing": bool,
        "save_steps": int,
        "stop_at_step": int,          # the notebook stops the run here, then resumes it
    },
    "03": {
        "base_model": str,
        "prompt_template": str,
        "mix_total": int,
        "fresh_names": str,
        "lora_r": int,
        "lora_alpha": int,
        "lora_dropout": float,
        "target_modules": list,
        "modules_to_save": list,
        "learning_rate": float,
        "epochs": float,
        "max_steps": int,
        "warmup_steps": int,
        "cutoff_len": int,
        "micro_batch": int,
        "grad_accum": int,
        "load_in_8bit": bool,
        "train_on_inputs": bool,
        "max_new_tokens": int,
        "num_beams": int,
        "copy_constrained": bool,
        "reuse_adapter": bool,        # classroom mode: load the workdir's adapter if it is this training's
    },
    "04": {
        "base_model": str,            # plays LLaMA: the model the diff is taken against
        "tuned_model": str,           # plays ZhiXi: base_model, continued-pretrained
        "diff_path": str,             # "" = make the diff here; else a released diff to recover
        "diff_dtype": str,            # float32 (exact) | float16 | bfloat16
        "adapter_path": str,          # a LoRA adapter to merge
        "adapter_base": str,          # the model that adapter was trained on
        "shard_size_mb": int,
    },
    "05": {
        "model_path": str,
        "load_in_8bit": bool,
        "max_new_tokens": int,
        "prompt_template": str,       # the template the served model was tuned with
        "heldout_texts": int,         # held-out sentences for the perplexity column
        "compare_prompts": int,       # prompts whose greedy answers are compared with fp32
        "gguf_type": str,             # f16 | q8_0
    },
    "06": {
        "base_model": str,            # "base" in the demo and the evaluation (00's)
        "model_path": str,            # the tuned model merged (04's); if missing, base + adapter
        "adapter_path": str,          # 03's LoRA adapter
        "prompt_template": str,
        "max_new_tokens": int,
        "eval_per_task": int,         # held-out examples per task and language scored
        "max_input_chars": int,       # the demo cuts longer input (with a notice)
    },
}

# Artifacts each notebook writes, relative to workdir. Later notebooks find
# them here unless a path parameter says otherwise.
ARTIFACTS: dict[str, dict[str, str]] = {
    "00": {"tokenizer": "00/tokenizer", "base_model": "00/base"},
    "01": {"dataset_prefix": "01/pretrain_text_document"},
    "02": {"pretrained_model": "02/consolidated"},
    "03": {"adapter": "03/adapter"},
    "04": {"merged_model": "04/merged"},
}

# Path parameters that default to an earlier notebook's artifact:
# notebook -> {parameter: (upstream notebook, artifact)}.
UPSTREAM: dict[str, dict[str, tuple[str, str]]] = {
    "01": {"tokenizer_path": ("00", "tokenizer")},
    "02": {"base_model": ("00", "base_model"), "dataset_prefix": ("01", "dataset_prefix")},
    # KnowLM tuned its continued-pretrained model (02); the course tunes the copy-capable
    # 00 base by default (notebook 03 says why), and base_model can point at 02 instead.
    "03": {"base_model": ("00", "base_model")},
    # 04: 00's base plays LLaMA, 02's continued-pretrained model plays ZhiXi; 03's adapter
    # was trained on 00's base, so that is what it is merged into.
    "04": {"base_model": ("00", "base_model"), "tuned_model": ("02", "pretrained_model"),
           "adapter_path": ("03", "adapter"), "adapter_base": ("00", "base_model")},
    "05": {"model_path": ("04", "merged_model")},
    "06": {"base_model": ("00", "base_model"), "model_path": ("04", "merged_model"),
           "adapter_path": ("03", "adapter")},
}

TOP_LEVEL = {"description", *COMMON} | set(SCHEMA)


def notebook_ids() -> list[str]:
    return sorted(SCHEMA)


def valid_keys(notebook: str) -> list[str]:
    """Every parameter name ``notebook`` accepts, common ones included."""
    _check_notebook(notebook)
    return sorted(COMMON) + sorted(SCHEMA[notebook])


def _check_notebook(notebook: str) -> None:
    if notebook not in SCHEMA:
        raise ConfigError(
            f"unknown notebook {notebook!r}; known: {', '.join(notebook_ids())}")


def _unknown(key: str, where: str, valid) -> ConfigError:
    return ConfigError(
        f"unknown key {key!r} in {where}; valid keys: {', '.join(sorted(valid))}")


def check_type(key: str, value: Any, expected, where: str) -> Any:
    """``value`` if it is of type ``expected`` (an int is accepted as a float); else ConfigError."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(
            f"{where}: {key!r} must be {name}, got {type(value).__name__} {value!r}")
    return value


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping, got {type(data).__name__}")
    return data


def _profile_path(name: str | Path) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"profile file not found: {path}")
        return path
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"bad profile name {name!r}; known: {', '.join(profile_names())}")
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r}; known: {', '.join(profile_names())}")
    return path


def validate_profile(data: Mapping, where: str) -> dict:
    """Check a profile mapping's keys and value types; return a normalised copy."""
    out: dict = {}
    for key, value in data.items():
        key = str(key).zfill(2) if isinstance(key, int) else key
        if key not in TOP_LEVEL:
            raise _unknown(key, where, TOP_LEVEL)
        if key in SCHEMA:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: section {key!r} must be a mapping")
            section = {}
            for k, v in value.items():
                if k not in SCHEMA[key]:
                    raise _unknown(k, f"{where} section {key!r}", SCHEMA[key])
                section[k] = check_type(k, v, SCHEMA[key][k], f"{where} [{key}]")
            out[key] = section
        elif key in COMMON:
            out[key] = check_type(key, value, COMMON[key], where)
        else:
            out[key] = value
    return out


def load_profile(name: str | Path = BASE_PROFILE) -> dict:
    """Load a profile by name (or .yaml path), layered on ``tiny``, validated."""
    path = _profile_path(name)
    data = validate_profile(_read_yaml(path), str(path.name))
    if path.stem != BASE_PROFILE or path.parent != PROFILES_DIR:
        base = load_profile(BASE_PROFILE)
        for key, value in data.items():
            if key in SCHEMA:
                base.setdefault(key, {}).update(value)
            else:
                base[key] = value
        data = base
    data["profile"] = path.stem
    return data


def notebook_params(profile: str | Path, notebook: str,
                    overrides: Mapping | None = None) -> dict:
    """Every parameter of ``notebook`` under ``profile``, with ``overrides`` on top."""
    _check_notebook(notebook)
    prof = load_profile(profile)
    params = {"profile": prof["profile"], "workdir": prof.get("workdir", ""),
              "seed": prof.get("seed", 0)}
    params.update(prof.get(notebook, {}))
    missing = set(SCHEMA[notebook]) - set(params)
    if missing:
        raise ConfigError(f"profile {prof['profile']!r} has no value for "
                          f"{', '.join(sorted(missing))} in section {notebook!r}")
    for key, value in (overrides or {}).items():
        if key not in params:
            raise _unknown(key, f"parameters of notebook {notebook}", params)
        expected = COMMON.get(key) or SCHEMA[notebook][key]
        params[key] = check_type(key, value, expected, f"notebook {notebook}")
    return params


@dataclass
class Config:
    """The resolved parameters of one notebook run."""
    notebook: str
    params: dict
    workdir: Path

    def __getattr__(self, name):  # cfg.max_len
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{name!r} is not a parameter of notebook "
                             f"{self.__dict__.get('notebook')}")

    @property
    def profile(self) -> str:
        return self.params["profile"]

    def path(self, name: str) -> Path:
        """Where a path parameter or an artifact of this notebook lives.

        An explicit, non-empty path parameter wins; an empty one means the
        upstream notebook's artifact in ``workdir`` (see :data:`UPSTREAM`).
        """
        explicit = self.params.get(name)
        if explicit:
            p = Path(explicit)
            return p if p.is_absolute() else ROOT / p
        if name in UPSTREAM.get(self.notebook, {}):
            nb, art = UPSTREAM[self.notebook][name]
            return self.workdir / ARTIFACTS[nb][art]
        if name in ARTIFACTS.get(self.notebook, {}):
            return self.workdir / ARTIFACTS[self.notebook][name]
        raise ConfigError(f"{name!r} is neither a path parameter nor an artifact "
                          f"of notebook {self.notebook}")

    def upstream_of(self, name: str) -> tuple[str, str] | None:
        """``(notebook, artifact)`` that an empty path parameter ``name`` stands for, if any."""
        return UPSTREAM.get(self.notebook, {}).get(name)

    def outputs(self) -> dict[str, Path]:
        """The artifacts this notebook writes into ``workdir`` (see :data:`ARTIFACTS`)."""
        return {name: self.workdir / rel for name, rel in ARTIFACTS.get(self.notebook, {}).items()}

    def stage_dir(self) -> Path:
        d = self.workdir / self.notebook
        d.mkdir(parents=True, exist_ok=True)
        return d

    def table(self) -> str:
        width = max(len(k) for k in self.params)
        return "\n".join(f"{k:<{width}}  {v!r}" for k, v in sorted(self.params.items()))


def workdir_for(profile: str, workdir: str = "") -> Path:
    if workdir:
        p = Path(workdir)
        return p if p.is_absolute() else ROOT / p
    return ROOT / "runs" / profile


def resolve(notebook: str, namespace: Mapping[str, Any], check: bool = True) -> Config:
    """Resolve a notebook's parameters from its namespace (``locals()``).

    The parameters cell shows the ``tiny`` values. A knob left at its tiny
    value follows the chosen profile; a knob set to anything else (by hand or
    by papermill) wins. Only names in :data:`SCHEMA` are read from the
    namespace, so the rest of ``locals()`` is ignored.

    With ``check`` (the default) the preflight runs before anything is
    written: every path parameter of this notebook must hold what it needs and
    every CUDA-only setting must fit this machine, or a
    :class:`~knowlm_nb.preflight.PreflightError` lists the problems and their
    fixes. An empty path whose upstream artifact is missing is fine on the
    ``tiny`` profile, where the notebook builds it (see :mod:`knowlm_nb.preflight`).
    """
    from . import preflight, report  # local: neither imports config

    _check_notebook(notebook)
    profile = namespace.get("profile", BASE_PROFILE)
    if not isinstance(profile, str):
        raise ConfigError(f"'profile' must be a profile name, got {profile!r}")
    tiny = notebook_params(BASE_PROFILE, notebook)
    chosen = notebook_params(profile, notebook)
    params = dict(chosen)
    for key in valid_keys(notebook):
        if key not in namespace or key == "profile":
            continue
        value = namespace[key]
        if value != tiny[key]:
            expected = COMMON.get(key) or SCHEMA[notebook][key]
            params[key] = check_type(key, value, expected, f"notebook {notebook}")
    cfg = Config(notebook=notebook, params=params,
                 workdir=workdir_for(params["profile"], params["workdir"]))
    if check:
        preflight.raise_errors(preflight.check(cfg), header=(
            f"notebook {notebook} cannot run with these parameters (profile "
            f"{cfg.profile!r}; nothing was run or written). Set them in the parameters cell, "
            "or pass -p NAME VALUE to python -m knowlm_nb.batch:"))
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    report.set_context(cfg.workdir, notebook)
    return cfg


def upstream_paths(notebook: str, workdir: Path) -> dict[str, str]:
    """The upstream artifact paths ``notebook`` takes as path parameters."""
    _check_notebook(notebook)
    return {param: str(workdir / ARTIFACTS[nb][art])
            for param, (nb, art) in UPSTREAM.get(notebook, {}).items()}
