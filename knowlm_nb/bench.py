"""Benchmarks: ``python -m knowlm_nb.bench NAME [options]``.

Each benchmark is a function in :data:`BENCHES` that takes the parsed extra
options (``argv`` after ``NAME``) and returns one JSON row (a dict). ``main``
prints the row and appends it to ``runs/bench/NAME.jsonl``. Ratios are measured
side by side in one run, so they mean something on any machine; tests never
assert a wall time.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import ROOT

BENCH_DIR = ROOT / "runs" / "bench"


def bench_chunking(argv: list[str]) -> dict:
    """Chunker throughput vs the raw tokenizer, greedy vs knowlm, RSS, mmap reads."""
    from .chunking import bench_main

    return bench_main(argv)


BENCHES = {
    "chunking": bench_chunking,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m knowlm_nb.bench NAME [options]\nNAME: {', '.join(BENCHES)}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"error: unknown benchmark {name!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    row = BENCHES[name](rest)
    row = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with open(BENCH_DIR / f"{name}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps(row, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
