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


_RAW_TOKENIZER = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
encode = getattr(tok, sys.argv[2])
texts = [json.loads(line)["text"] for path in sys.argv[3:] for line in open(path, encoding="utf-8")]
t, c = time.perf_counter(), time.process_time()
for i in range(0, len(texts), 32):
    encode(texts[i:i + 32], add_special_tokens=False)
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""

_PREPARE = """
import json, resource, sys, time
from knowlm_nb import corpus
kw = json.loads(sys.argv[1])
r0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
t = time.perf_counter()
s = corpus.prepare(progress=False, weights="natural", **kw)
wall = time.perf_counter() - t
r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(r0, r))
# peak RSS of this process (VmHWM: ru_maxrss would keep the parent's peak across exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
rss = int(hwm[0].split()[1]) / 1024 if hwm else r[0].ru_maxrss / 1024
print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss, "tokens": s["tokens"],
                  "samples": s["samples"], "chunking": s["chunking"]}))
"""


def best_of(fn, repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def corpus_times(inputs, k: int, folder: Path) -> Path:
    """The JSONL files of ``inputs`` (globs), each repeated ``k`` times, written into ``folder``."""
    from . import corpus

    folder.mkdir(parents=True, exist_ok=True)
    for path in corpus.input_files(inputs):
        (folder / path.name).write_bytes(path.read_bytes() * k)
    return folder


def bench_chunking(argv: list[str]) -> dict:
    """01: the whole ``corpus prepare`` against the raw batch tokenizer, side by side.

    Every figure is a ratio of runs made in this one call, each in its own
    process, repeated ``--repeats`` times in turn (best of R): ``prepare``
    (read, clean, split, tokenize, pack, write; 1 and 2 processes, with and
    without dedup, greedy and knowlm) ÷ ``encode_batch_fast`` on the same raw
    documents at the same thread count; 2 processes ÷ 1; the chunker's core
    alone; a 1 MB line without punctuation vs a 250 kB one (linear: ~4x);
    peak RSS of ``prepare`` on the corpus x1 and x10; mmap reads/s.
    The machine's load average is recorded: on a loaded machine the wall-clock
    ratios, the 2-process one above all, say more about the neighbours.

    ``--max-len N`` (256), ``--repeats R`` (3), ``--times K`` (8: the sample corpus x K).
    The fill rows come from :func:`fill_table`.
    """
    import argparse
    import os
    import random
    import shutil
    import subprocess
    import tempfile

    from . import chunking, config, corpus, files, indexed_dataset, tiny

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench chunking")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--times", type=int, default=8)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-chunking-"))
    tok_dir = ROOT / "runs" / "tiny" / config.ARTIFACTS["00"]["tokenizer"]
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir = tmp / "tokenizer"
        sample = files.find_files("data_samples/corpus/*.jsonl")
        tiny.train_tokenizer(tiny.iter_texts(sample)).save_pretrained(tok_dir)

    sample = ["data_samples/corpus/*.jsonl"]
    big = corpus_times(sample, args.times, tmp / f"x{args.times}")
    inputs = sorted(str(p) for p in big.glob("*.jsonl"))

    def run(code: str, argv: list[str], threads: int = 1) -> dict:
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                             text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def prep(name: str, **kw) -> tuple[str, str, list[str], int]:
        kw = {"inputs": [str(big / "*.jsonl")], "tokenizer_dir": str(tok_dir),
              "max_len": args.max_len, "out_prefix": str(tmp / name), "dedup": False, **kw}
        return name, _PREPARE, [json.dumps(kw)], 1

    # the raw batch tokenizer on the raw documents: encode_batch (ids, offsets, ...:
    # the baseline) and encode_batch_fast (ids only, what prepare calls)
    raw = [str(tok_dir), "encode_batch", *inputs]
    raw_fast = [str(tok_dir), "encode_batch_fast", *inputs]
    jobs = [("raw_1_thread", _RAW_TOKENIZER, raw, 1),
            ("raw_2_threads", _RAW_TOKENIZER, raw, 2),
            ("raw_fast_1_thread", _RAW_TOKENIZER, raw_fast, 1),
            prep("prepare_1_proc", num_proc=1),
            prep("prepare_2_procs", num_proc=2),
            prep("prepare_1_proc_dedup", num_proc=1, dedup=True),
            prep("prepare_2_procs_dedup", num_proc=2, dedup=True),
            prep("prepare_1_proc_knowlm", num_proc=1, mode="knowlm")]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):          # in turn, so that a burst of load hits all alike
        for name, code, argv_, threads in jobs:
            row = run(code, argv_, threads)
            if name not in best or row["wall"] < best[name]["wall"]:
                best[name] = row
    wall = {k: v["wall"] for k, v in best.items()}
    tokens = best["prepare_1_proc"]["chunking"]["content_tokens"]

    # the chunker's core in this process: tokenize once + pack, on cleaned, split text
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    docs = [d for d, _ in corpus.cleaned_sentences([str(big / "*.jsonl")], dedup=False)]
    sentences = [corpus.split_sentences(d.text, d.lang) for d in docs]
    batches = [(["".join(s) for s in sentences[i:i + 32]], sentences[i:i + 32])
               for i in range(0, len(sentences), 32)]
    backend = chunking.TokenizerFiles(tok_dir).backend_tokenizer

    raw_s = best_of(lambda: [backend.encode_batch_fast(b, add_special_tokens=False)
                             for b, _ in batches], args.repeats)
    core = chunking.Chunker(tok, args.max_len)
    core_s = best_of(lambda: [core.chunk(s) for _, s in batches], args.repeats)

    # linear time on hostile input: a line without punctuation, 4x longer
    def line_cost(n):
        text = "abcdefghij" * (n // 10)
        c = chunking.Chunker(tok, 256)
        return best_of(lambda: c.chunk([corpus.split_sentences(text, "en")]), 3)

    line_ratio = line_cost(1_000_000) / line_cost(250_000)

    # peak RSS of a whole prepare (one process) on the corpus x1 and x10
    rss = {}
    for k in (1, 10):
        folder = corpus_times(sample, k, tmp / f"x{k}")
        rss[k] = run(_PREPARE, [json.dumps({
            "inputs": [str(folder / "*.jsonl")], "tokenizer_dir": str(tok_dir),
            "max_len": args.max_len, "out_prefix": str(tmp / f"out{k}"), "dedup": False})])

    ds = indexed_dataset.IndexedDataset(tmp / "out10")
    rng = random.Random(0)
    picks = [rng.randrange(len(ds)) for _ in range(200_000)]
    t = time.perf_counter()
    for i in picks:
        ds[i]
    reads_per_s = len(picks) / (time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a, b):
        return round(wall[a] / wall[b], 3)

    ch = best["prepare_1_proc"]["chunking"]
    return {
        "max_len": args.max_len,
        "corpus": f"data_samples/corpus x{args.times}",
        "documents": ch["documents"],
        "tokens": tokens,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds": {k: round(v, 3) for k, v in wall.items()},
        "raw_tokenizer_tokens_per_s": round(tokens / wall["raw_1_thread"]),
        "raw_fast_tokenizer_tokens_per_s": round(tokens / wall["raw_fast_1_thread"]),
        "prepare_tokens_per_s": round(tokens / wall["prepare_1_proc"]),
        # the whole command / the raw batch tokenizer, same thread count (target >= 0.8)
        "prepare_vs_raw_1_proc": ratio("raw_1_thread", "prepare_1_proc"),
        # the same against encode_batch_fast (no offsets): a stricter baseline
        "prepare_vs_raw_fast_1_proc": ratio("raw_fast_1_thread", "prepare_1_proc"),
        # the same in CPU seconds: what the load of other processes disturbs least
        "prepare_vs_raw_1_proc_cpu": round(best["raw_1_thread"]["cpu"]
                                           / best["prepare_1_proc"]["cpu"], 3),
        "prepare_vs_raw_1_proc_dedup": ratio("raw_1_thread", "prepare_1_proc_dedup"),
        "prepare_vs_raw_1_proc_knowlm": ratio("raw_1_thread", "prepare_1_proc_knowlm"),
        "prepare_vs_raw_2_procs": ratio("raw_2_threads", "prepare_2_procs"),
        "prepare_vs_raw_2_procs_dedup": ratio("raw_2_threads", "prepare_2_procs_dedup"),
        "two_procs_speedup": ratio("prepare_1_proc", "prepare_2_procs"),      # target >= 1.7
        "raw_two_threads_speedup": ratio("raw_1_thread", "raw_2_threads"),
        "cpu_seconds_2_procs_vs_1": round(best["prepare_2_procs"]["cpu"]
                                          / best["prepare_1_proc"]["cpu"], 3),
        "chunker_core_vs_tokenizer": round(raw_s / core_s, 3),
        "line_1mb_vs_250kb_time": round(line_ratio, 2),                       # linear: ~4
        "fill": {k: ch[k] for k in ("mean_fill", "mean_fill_long", "mean_fill_short",
                                    "long_documents", "duplicated_tokens")},
        "fill_table": fill_table(tok),
        "knowlm_duplicated_tokens": best["prepare_1_proc_knowlm"]["chunking"]["duplicated_tokens"],
        "prepare_x1": {k: rss[1][k] for k in ("rss_mb", "wall", "tokens")},
        "prepare_x10": {k: rss[10][k] for k in ("rss_mb", "wall", "tokens")},
        "peak_rss_growth_mb": round(rss[10]["rss_mb"] - rss[1]["rss_mb"], 1),  # target < 100
        "mmap_random_reads_per_s": round(reads_per_s),                         # target >= 100k
    }


def prepare_vs_tokenizer(inputs, tokenizer_dir, max_len: int, times: int = 4,
                         repeats: int = 2) -> dict:
    """In this process, one thread each, best of ``repeats``: the whole
    ``corpus.prepare`` (1 process, no dedup) against the raw batch tokenizer on
    the same raw documents (the JSONL ``inputs`` repeated ``times``).

    A light, in-process version of ``bench chunking`` for a notebook; tokenizer
    threads are off meanwhile (:func:`chunking.one_tokenizer_thread`). Returns
    seconds and ratios (``> 1``: prepare is faster than the raw call).
    """
    import json
    import shutil
    import tempfile

    from . import chunking, corpus

    backend = chunking.TokenizerFiles(tokenizer_dir).backend_tokenizer
    tmp = Path(tempfile.mkdtemp(prefix="prepare-vs-tokenizer-"))

    def raw(encode):
        for i in range(0, len(texts), 32):
            encode(texts[i:i + 32], add_special_tokens=False)

    try:
        corpus_times(inputs, times, tmp)
        texts = [json.loads(line)["text"] for path in sorted(tmp.glob("*.jsonl"))
                 for line in path.open(encoding="utf-8") if line.strip()]
        with chunking.one_tokenizer_thread():
            seconds = {
                "encode_batch": best_of(lambda: raw(backend.encode_batch), repeats),
                "encode_batch_fast": best_of(lambda: raw(backend.encode_batch_fast), repeats),
                "prepare": best_of(lambda: corpus.prepare(
                    [str(tmp / "*.jsonl")], tokenizer_dir, max_len, tmp / "out" / "ds",
                    num_proc=1, dedup=False, progress=False, weights="natural"), repeats),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"documents": len(texts), "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "prepare_vs_encode_batch": round(seconds["encode_batch"] / seconds["prepare"], 3),
            "prepare_vs_encode_batch_fast": round(seconds["encode_batch_fast"]
                                                  / seconds["prepare"], 3)}


def fill_table(tokenizer, max_lens=(256, 1024), joins=(1, 25)) -> list[dict]:
    """How full greedy packs the samples of long documents, and what bounds it.

    On the sample corpus (cleaned, deduplicated) as it is and with every ``k``
    documents of a language joined into one (long documents, as in a real
    corpus), per ``max_len``: fill over the samples of documents longer than
    ``max_len`` (``fill_long``), over those samples but each document's last
    (``fill_not_last``: what sentence ends alone cost), and the fill if the last
    samples and the short documents were packed *across* documents (first-fit
    decreasing, several documents per sample; not what ``prepare`` does).
    Greedy's sample count is the fewest any packer that keeps sentences whole and
    in order within a document can reach, so ``fill_long`` is also that bound.
    """
    from . import chunking, corpus

    docs = list(corpus.cleaned_sentences(["data_samples/corpus/*.jsonl"]))
    rows = []
    for k in joins:
        joined = []
        for lang in ("zh", "en", "code"):
            group = [s for d, s in docs if d.lang == lang]
            for i in range(0, len(group), k):
                # documents end with a paragraph break when joined
                joined.append([x for s in group[i:i + k] for x in s[:-1] + [s[-1] + "\n"]]
                              if k > 1 else group[i])
        for max_len in max_lens:
            chunker = chunking.Chunker(tokenizer, max_len)
            not_last = [0, 0]          # tokens, samples
            rest = []                  # last samples of long documents, short documents
            for ids, lengths in chunker.tokenize(joined):
                flat, sizes, st = chunker.pack_flat(ids, lengths)
                chunker.stats.add(st)
                if st.long_documents:
                    not_last[0] += int(sizes[:-1].sum())
                    not_last[1] += len(sizes) - 1
                rest.append(int(sizes[-1]))
            bins: list[int] = []
            for n in sorted(rest, reverse=True):
                k_fit = next((b for b, used in enumerate(bins) if used + n <= max_len), None)
                if k_fit is None:
                    bins.append(n)
                else:
                    bins[k_fit] += n
            s = chunker.stats.summary(max_len)
            rows.append({
                "max_len": max_len, "documents_joined": k, "documents": s["documents"],
                "long_documents": s["long_documents"],
                "mean_document_tokens": round(s["content_tokens"] / s["documents"]),
                "fill_long": s["mean_fill_long"],
                "fill_not_last": round(not_last[0] / (not_last[1] * max_len), 4)
                if not_last[1] else None,
                "fill_across_documents": round((not_last[0] + sum(bins))
                                               / ((not_last[1] + len(bins)) * max_len), 4),
                "duplicated_tokens": s["duplicated_tokens"],
                "mean_sentence_tokens": round(s["content_tokens"] / s["sentences"], 1),
            })
    return rows


def bench_pretrain(argv: list[str]) -> dict:
    """02: tokens/s of a single-process plain Trainer vs 2-process ZeRO-2 and
    ZeRO-3 on CPU (same global batch and data), run one after the other; as ratios.

    ``--steps N`` (default 12), ``--seq_len`` (default 256), ``--micro_batch``.
    """
    import argparse
    import os
    import shutil

    from . import launch, pretrain

    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.bench pretrain")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq_len", type=int, default=256, help="at least notebook 01's max_len")
    ap.add_argument("--micro_batch", type=int, default=4)
    ap.add_argument("--workdir", default=str(BENCH_DIR / "pretrain"))
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    base = {"workdir": str(work), "max_steps": a.steps, "seq_len": a.seq_len,
            "micro_batch": a.micro_batch, "save_steps": a.steps, "stop_at_step": 0,
            "warmup_steps": 1}
    cfg0 = pretrain.settings("tiny", overrides=base)
    pretrain.ensure_inputs(cfg0, show=lambda s: print(s, file=sys.stderr))
    procs = cfg0.num_gpus
    setups = {
        "plain_1proc": dict(deepspeed_config="", num_gpus=1, grad_accum=cfg0.grad_accum * procs),
        "zero2_2proc": dict(deepspeed_config="env/deepspeed/zero2.json", num_gpus=procs),
        "zero3_2proc": dict(deepspeed_config="env/deepspeed/zero3.json", num_gpus=procs),
    }
    rows = {}
    for name, extra in setups.items():
        cfg = pretrain.settings("tiny", overrides={**base, **extra})
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        argv_ = pretrain.command_for(cfg, pretrain.write_run_config(cfg, out / "run.yaml"), out, "never")
        threads = (os.cpu_count() or 1) // cfg.num_gpus  # every setup uses all the cores
        res = launch.run_job(argv_, launch.job_env(threads), show=None, log_path=out / "launcher.log")
        if res.returncode != 0:
            raise pretrain.PretrainError(f"bench {name} failed:\n" + "\n".join(res.tail[-20:]))
        steps = pretrain.read_log(out)  # time from the end of step 2: start-up and warm-up excluded
        seconds = steps[-1]["wall"] - steps[1]["wall"]
        tokens = steps[-1]["tokens"] - steps[1]["tokens"]
        rows[name] = {"tokens_per_s": tokens / seconds, "final_loss": steps[-1]["loss"],
                      "wall_s": res.seconds}
    ref = rows["plain_1proc"]["tokens_per_s"]
    return {"steps": a.steps, "seq_len": a.seq_len, "global_batch": a.micro_batch * cfg0.grad_accum * procs,
            "cores": os.cpu_count(), **{f"{k}_tokens_per_s": round(v["tokens_per_s"], 1) for k, v in rows.items()},
            **{f"{k}_vs_plain": round(v["tokens_per_s"] / ref, 3) for k, v in rows.items() if k != "plain_1proc"},
            "final_loss": {k: v["final_loss"] for k, v in rows.items()}}


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
    "weights": bench_weights,
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
