import json
import os
from pathlib import Path

import pytest

from knowlm_nb import ROOT, batch, preflight

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> str:
    """A small JSONL corpus (zh / en / code) taken from data_samples; returns a glob."""
    src = sorted((ROOT / "data_samples" / "corpus").glob("*.jsonl"))
    out = tmp_path / "corpus"
    out.mkdir()
    for path in src:
        lines = path.read_text(encoding="utf-8").splitlines()[:40]
        (out / path.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(out / "*.jsonl")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture
def cpu_machine(monkeypatch):
    """The preflight sees a machine without CUDA, whatever the tests run on."""
    monkeypatch.setattr(preflight, "machine", lambda: preflight.Machine(gpus=0, bf16=False, cpus=2))


def run_batch(capsys, *argv):
    """``python -m knowlm_nb.batch ARGV --no-progress``: (exit code, stdout, stderr)."""
    code = batch.main([*argv, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err
