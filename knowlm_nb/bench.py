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
    """01: chunker vs raw tokenizer, greedy vs knowlm, peak RSS at x1 / x10, mmap reads.

    ``--max-len N`` (default 256), ``--repeats R`` (default 3, best of R).
    """
    import argparse
    import os
    import random
    import subprocess
    import tempfile

    from transformers import AutoTokenizer

    from . import chunking, config, corpus, indexed_dataset, tiny

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench chunking")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-chunking-"))
    tok_dir = ROOT / "runs" / "tiny" / config.ARTIFACTS["00"]["tokenizer"]
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir = tmp / "tokenizer"
        files = tiny.corpus_files("data_samples/corpus/*.jsonl")
        tiny.train_tokenizer(tiny.iter_texts(files)).save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)

    # the same cleaned text for both: documents, and their sentences
    docs = [d for d, _ in corpus.cleaned_sentences(["data_samples/corpus/*.jsonl"])]
    texts = [d.text for d in docs]
    t = time.perf_counter()
    sentences = [corpus.split_sentences(d.text, d.lang) for d in docs]
    split_s = time.perf_counter() - t
    batches = [(texts[i:i + 32], sentences[i:i + 32]) for i in range(0, len(texts), 32)]

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    n_tokens = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    # the raw batch tokenizer: the same Rust call the chunker makes, on whole documents
    backend = tok.backend_tokenizer
    raw_s = timed(lambda: [backend.encode_batch_fast(b, add_special_tokens=False)
                           for b, _ in batches])
    hf_s = timed(lambda: [tok(b, add_special_tokens=False) for b, _ in batches])
    chunkers = {m: chunking.Chunker(tok, args.max_len, mode=m) for m in chunking.MODES}
    mode_s = {m: timed(lambda c=c: [c.chunk(s) for _, s in batches]) for m, c in chunkers.items()}
    per_mode = {}
    for m, c in chunkers.items():
        c.stats = chunking.ChunkStats()
        for _, s in batches:
            c.chunk(s)
        per_mode[m] = c.stats.summary(args.max_len)

    # peak RSS of a whole prepare run (one process) on the corpus repeated x1 and x10
    rss = {}
    for times in (1, 10):
        folder = tmp / f"x{times}"
        folder.mkdir()
        for path in sorted((ROOT / "data_samples" / "corpus").glob("*.jsonl")):
            data = path.read_bytes()
            (folder / path.name).write_bytes(data * times)
        code = ("import json, resource, sys; from knowlm_nb import corpus; "
                "s = corpus.prepare([sys.argv[1]], sys.argv[2], int(sys.argv[3]), sys.argv[4], "
                "progress=False, dedup=False, weights='natural'); "
                "print(json.dumps({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
                "'seconds': s['seconds'], 'tokens': s['tokens'], 'samples': s['samples']}))")
        out = subprocess.run([sys.executable, "-c", code, str(folder / "*.jsonl"), str(tok_dir),
                              str(args.max_len), str(tmp / f"out{times}")],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        rss[times] = json.loads(out.stdout.strip().splitlines()[-1])

    ds = indexed_dataset.IndexedDataset(tmp / "out10")
    rng = random.Random(0)
    picks = [rng.randrange(len(ds)) for _ in range(200_000)]
    t = time.perf_counter()
    for i in picks:
        ds[i]
    reads_per_s = len(picks) / (time.perf_counter() - t)

    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "max_len": args.max_len,
        "documents": len(texts),
        "tokens": n_tokens,
        "raw_tokenizer_tokens_per_s": round(n_tokens / raw_s),
        "hf_tokenizer_call_tokens_per_s": round(n_tokens / hf_s),
        "chunker_tokens_per_s": round(n_tokens / mode_s["greedy"]),
        "chunker_vs_tokenizer": round(raw_s / mode_s["greedy"], 3),          # target >= 0.8
        "greedy_vs_knowlm_speed": round(mode_s["knowlm"] / mode_s["greedy"], 3),
        "sentence_split_tokens_per_s": round(n_tokens / split_s),
        "greedy": per_mode["greedy"],
        "knowlm": per_mode["knowlm"],
        "prepare_x1": rss[1],
        "prepare_x10": rss[10],
        "peak_rss_growth_mb": round(rss[10]["rss_mb"] - rss[1]["rss_mb"], 1),  # target < 100
        "mmap_random_reads_per_s": round(reads_per_s),                       # target >= 100k
    }


def bench_pretrain(argv: list[str]) -> dict:
    """02: tokens/s of a single-process plain Trainer vs 2-process ZeRO-2 and
    ZeRO-3 on CPU (same global batch and data), as ratios.

    ``--steps N`` (default 12), ``--seq_len`` (default 256), ``--micro_batch``.
    """
    from .pretrain import bench_main

    return bench_main(argv)


def bench_weights(argv: list[str]) -> dict:
    """04: streamed recovery vs the naive whole-model one vs ``cp``, in subprocesses, side by side.

    ``--tensors N`` (default 8) fp32 matrices of ``--tensor-mb`` MiB (default 48; the
    last is twice as large), so the checkpoint is a few hundred MiB.
    """
    import argparse
    import shutil
    import subprocess
    import tempfile

    from . import weights

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench weights")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--tensor-mb", type=float, default=48)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-weights-", dir=ROOT / "runs"))
    try:
        base, tuned = weights.synthetic_pair(tmp / "pair", args.tensors, args.tensor_mb)
        weights.make_diff(base, tuned, tmp / "diff")
        ck = weights.Checkpoint(tuned)
        ckpt = sum(ck.nbytes(n) for n in ck.names) / 2**20
        largest = max(ck.nbytes(n) for n in ck.names) / 2**20
        cli = [sys.executable, "-m", "knowlm_nb.weights"]
        src = ["--base", str(base), "--diff", str(tmp / "diff")]
        imports = weights.rss_trace([sys.executable, "-c", "import torch, safetensors, knowlm_nb.weights"])
        # cp of the same bytes (the base checkpoint), timed like the others: a subprocess
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(base), str(tmp / "copy")], check=True)
        cp_s = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cp_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        stream = weights.rss_trace(cli + ["recover", *src, "--out", str(tmp / "streamed")])
        naive = weights.rss_trace(cli + ["recover-naive", *src, "--out", str(tmp / "naive")])
        summary = json.loads(stream["stdout"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    above = stream["peak_mb"] - imports["peak_mb"]
    return {
        "checkpoint_mb": round(ckpt, 1), "largest_tensor_mb": round(largest, 1),
        "imports_peak_mb": round(imports["peak_mb"], 1),
        "stream_peak_mb": round(stream["peak_mb"], 1), "naive_peak_mb": round(naive["peak_mb"], 1),
        "stream_peak_over_largest_tensor": round(stream["peak_mb"] / largest, 2),
        "stream_above_imports_over_largest_tensor": round(above / largest, 2),  # target <= 1.5
        "stream_over_naive_peak": round(stream["peak_mb"] / naive["peak_mb"], 3),
        "stream_over_checkpoint_peak": round(stream["peak_mb"] / ckpt, 3),
        "naive_over_checkpoint_peak": round(naive["peak_mb"] / ckpt, 3),
        "cp_s": round(cp_s, 2), "stream_s": round(stream["seconds"], 2),
        "naive_s": round(naive["seconds"], 2),
        "stream_over_cp_time": round(stream["seconds"] / cp_s, 2),          # target <= 3
        "stream_over_cp_time_without_imports": round(
            (stream["seconds"] - imports["seconds"]) / cp_s, 2),
        "stream_phases_s": {k: summary[k] for k in ("check_base_s", "write_s", "verify_s")},
        # CPU seconds (user + sys) are steadier than wall time on a shared machine
        "cp_cpu_s": round(cp_cpu, 2), "imports_cpu_s": round(imports["cpu_s"], 2),
        "stream_cpu_s": round(stream["cpu_s"], 2), "naive_cpu_s": round(naive["cpu_s"], 2),
        "stream_over_cp_cpu_without_imports": round(
            (stream["cpu_s"] - imports["cpu_s"]) / max(cp_cpu, 1e-3), 2),
    }


BENCHES = {
    "chunking": bench_chunking,
    "pretrain": bench_pretrain,
    "weights": bench_weights,
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
