import json
import os
from pathlib import Path

import pytest

from knowlm_nb import ROOT

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
