"""Headline figures and the environment check.

``record(name, value)`` stores one figure of the running notebook in
``<workdir>/metrics/<notebook>.json`` (written atomically); the batch runner
collects those files into ``summary.md`` / ``summary.json``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from . import ROOT
from .files import write_json

_context: dict[str, Any] = {"workdir": None, "notebook": None}


def set_context(workdir: Path, notebook: str) -> None:
    """Called by ``config.resolve``: where ``record`` writes, for which notebook."""
    _context["workdir"] = Path(workdir)
    _context["notebook"] = notebook


def metrics_path(workdir: Path, notebook: str) -> Path:
    return Path(workdir) / "metrics" / f"{notebook}.json"


def load_metrics(workdir: Path, notebook: str) -> dict:
    path = metrics_path(workdir, notebook)
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def record(name: str, value: Any, *, workdir: Path | None = None,
           notebook: str | None = None) -> None:
    """Record a headline figure of the current notebook and print it.

    ``value`` must be a finite number, a bool or a short string.
    """
    workdir = workdir or _context["workdir"]
    notebook = notebook or _context["notebook"]
    if workdir is None or notebook is None:
        raise RuntimeError("report.record needs a context: call config.resolve(...) first")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
        raise ValueError(f"metric name must be an identifier-like string, got {name!r}")
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str):
        pass
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not finite: {value!r}")
    else:
        raise TypeError(f"metric {name!r} must be a number, bool or str, "
                        f"got {type(value).__name__}")
    data = load_metrics(workdir, notebook)
    data[name] = value
    write_json(metrics_path(workdir, notebook), data)
    print(f"[record] {notebook}.{name} = {value!r}")


# ---------------------------------------------------------------- environment

def _pins(requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def environment(requirements: Path | None = None) -> list[dict]:
    """Installed version of every pinned package against its pin (OK / FAIL).

    A CUDA build such as ``2.13.0+cu128`` satisfies the pin ``2.13.0``.
    """
    rows = []
    for name, pin in _pins(requirements or ROOT / "requirements.txt").items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        ok = have is not None and have.split("+", 1)[0] == pin
        rows.append({"package": name, "pinned": pin, "installed": have or "missing",
                     "status": "OK" if ok else "FAIL"})
    return rows


def machine() -> dict:
    """Python, OS, cores, memory and accelerator of this machine."""
    import psutil
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return info


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(empty)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- pipeline map

PIPELINE = [
    ("00", "setup &\ntiny zoo", "tokenizer +\ntiny Llama", "tiny"),
    ("01", "corpus &\ngreedy chunking", "mmap dataset\n(.bin / .idx)", "corpus"),
    ("02", "distributed\npretraining", "pretrained\nbase", "pretrain"),
    ("03", "LoRA instruction\ntuning", "LoRA\nadapter", "instruct"),
    ("04", "weight diff &\nrecovery", "recovered +\nmerged model", "weights"),
    ("05", "8-bit\ninference", "int8 model,\ndecoding presets", "inference"),
    ("06", "IE prompting\n& widgets", "NER / RE / EE\nF1, demo", "widgets"),
]


def pipeline_map(current: str | None = None, ax=None):
    """Draw the recipe's stages as a chain of boxes; highlight ``current``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(14, 3.4))
    n = len(PIPELINE)
    for i, (nb, title, artifact, module) in enumerate(PIPELINE):
        x = i * 1.9
        face = "#ffd54f" if nb == current else "#e3f2fd"
        ax.add_patch(FancyBboxPatch((x, 0), 1.6, 1.4, boxstyle="round,pad=0.05",
                                    fc=face, ec="#1565c0", lw=1.2))
        ax.text(x + 0.8, 1.2, nb, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + 0.8, 0.9, title, ha="center", va="center", fontsize=8.5)
        ax.text(x + 0.8, 0.48, artifact, ha="center", va="center", fontsize=7.5, color="#444",
                style="italic")
        ax.text(x + 0.8, 0.12, f"knowlm_nb.{module}", ha="center",
                va="center", fontsize=7, family="monospace", color="#1565c0")
        if i < n - 1:
            ax.annotate("", xy=(x + 1.88, 0.7), xytext=(x + 1.66, 0.7),
                        arrowprops=dict(arrowstyle="->", lw=1.4))
    ax.set_xlim(-0.2, n * 1.9)
    ax.set_ylim(-0.2, 1.6)
    ax.axis("off")
    ax.set_title("The KnowLM recipe, one notebook per stage", fontsize=11)
    return ax


def grouped_bars(table: dict[str, dict[str, float]], ylabel: str, title: str, ax=None):
    """Bar chart of ``{series: {group: value}}``, one colour per series."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    groups = list(next(iter(table.values())))
    width = 0.8 / len(table)
    for i, (series, row) in enumerate(table.items()):
        ax.bar([j + i * width for j in range(len(groups))], [row[g] for g in groups],
               width, label=series)
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
