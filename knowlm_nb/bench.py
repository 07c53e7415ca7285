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


def bench_inference(argv: list[str]) -> dict:
    """05: fp32 against bf16, bitsandbytes 8-bit and torchao int8, each in its own process:
    weight memory (and vs fp16), peak RSS, tokens/s (vs fp32), perplexity change, same greedy.

    On the trained tiny base (``--model``, default the shipped one) and on a
    random-init ~29M-parameter Llama built offline (memory/speed ratios only:
    its perplexity is a random model's). ``--texts N``, ``--prompts N``,
    ``--new-tokens N``, ``--skip-wide``.
    """
    import argparse
    import tempfile

    from . import inference

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench inference")
    ap.add_argument("--model", default=str(ROOT / "data_samples" / "tiny_base"))
    ap.add_argument("--texts", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--quantizations", default="fp32,bf16,bnb8,int8")
    ap.add_argument("--skip-wide", action="store_true")
    args = ap.parse_args(argv)
    texts = inference.heldout_texts(args.texts)
    prompts = texts[:args.prompts]
    quants = args.quantizations.split(",")
    keep = ("weight_mb", "weight_vs_fp16", "weight_vs_fp32", "peak_rss_mb", "rss_loaded_mb",
            "tokens_per_s", "speed_vs_fp32", "perplexity", "ppl_change", "same_greedy",
            "linear8bit_layers", "parameters")

    def table(model_dir):
        rows = inference.compare(model_dir, quants, texts, prompts, args.new_tokens)
        return {r["quantization"]: {k: (round(r[k], 4) if isinstance(r[k], float) else r[k])
                                    for k in keep} for r in rows}

    out = {"texts": len(texts), "prompts": len(prompts), "new_tokens": args.new_tokens,
           "tiny_base": table(args.model)}
    if not args.skip_wide:
        wide = inference.build_wide_model(Path(tempfile.gettempdir()) / "knowlm-bench-wide",
                                          args.model)
        out["wide_random"] = table(wide)
        out["wide_note"] = "random init: memory and speed ratios only; its perplexity is meaningless"
    return out


def bench_serve(argv: list[str]) -> dict:
    """05: N concurrent clients against a local /generate server for a bounded time:
    requests sent / answered / failed, p50 / p99 latency, server RSS before and after.

    ``--clients N`` (4), ``--seconds S`` (30), ``--new-tokens N`` (8), ``--model DIR``,
    ``--rss-bound-mb`` (50: the growth allowed before ``rss_ok`` is false).
    """
    import argparse
    import statistics
    import threading

    import httpx

    from . import serve

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench serve")
    ap.add_argument("--model", default=str(ROOT / "data_samples" / "tiny_base"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rss-bound-mb", type=float, default=50)
    args = ap.parse_args(argv)
    body = {"instruction": "List the names in the text.",
            "input": "Marta Velling joined the Harrowgate Institute in March 2019.",
            "parameters": {"max_new_tokens": args.new_tokens}}
    with serve.start(args.model, template="alpaca_short") as server:
        with httpx.Client(base_url=server.url, timeout=120) as c:   # warm up, then measure
            c.post("/generate", json=body)
        rss_before = server.rss_mb()
        latencies: list[float] = []
        counts = {"sent": 0, "answered": 0, "failed": 0}
        lock = threading.Lock()
        end = time.monotonic() + args.seconds

        def client():
            with httpx.Client(base_url=server.url, timeout=300) as c:
                while time.monotonic() < end:
                    t = time.perf_counter()
                    with lock:
                        counts["sent"] += 1
                    try:
                        ok = c.post("/generate", json=body).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        counts["answered" if ok else "failed"] += 1
                        if ok:
                            latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_after = server.rss_mb()
        with httpx.Client(base_url=server.url) as c:
            health = c.get("/health").json()
    lat = sorted(latencies)
    pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None  # noqa: E731
    return {"clients": args.clients, "seconds": args.seconds, "new_tokens": args.new_tokens,
            **counts, "requests_per_s": round(counts["answered"] / args.seconds, 2),
            "p50_s": pct(0.50), "p99_s": pct(0.99),
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "max_concurrent_generations": health["max_concurrent_generations"],
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
            "rss_growth_mb": round(rss_after - rss_before, 1),
            "rss_bound_mb": args.rss_bound_mb,
            "rss_ok": rss_after - rss_before <= args.rss_bound_mb}


BENCHES = {
    "chunking": bench_chunking,
    "pretrain": bench_pretrain,
    "inference": bench_inference,
    "serve": bench_serve,
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
