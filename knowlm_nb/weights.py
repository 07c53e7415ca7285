"""04: weight diffs, low-memory recovery and LoRA merges, streamed per tensor and checked by sha256 manifests.

KnowLM released ZhiXi-13B as a *diff* against LLaMA-13B. Its recovery script
loaded both models whole in fp32 (about 100 GB of RAM) and checked a sum of all
weights. Here every step streams: a tensor (or a block of its rows) is read,
combined and written before the next is touched, so memory stays near one
block whatever the model's size, and every tensor is checked by SHA-256.

    python -m knowlm_nb.weights make-diff  --base B --tuned T --out D [--dtype float16]
    python -m knowlm_nb.weights recover    --base B --diff D --out R
    python -m knowlm_nb.weights merge-lora --model M --adapter A --out O
    python -m knowlm_nb.weights verify     --model R --manifest D/manifest.json

* :class:`Checkpoint` reads a folder or file: sharded or single safetensors
  (``safetensors.safe_open``, header checked against the file size, so a
  truncated shard is a clear error) or KnowLM's ``pytorch_model-*.bin`` shards
  (``torch.load(weights_only=True)``: a pickle that would run code is refused).
* :func:`make_diff` writes ``tuned - base`` as sharded safetensors with a
  ``manifest.json``: the sha256 of every base tensor the recovery needs, of
  every diff tensor and of every recovered tensor (:func:`files.tensor_sha256`'s
  digest, computed block by block), and the max error of a lossy (fp16/bf16)
  diff. A fp32 diff is exact: the few elements whose ``base + (tuned - base)``
  would round differently from ``tuned`` are put back by a sparse patch.
* :func:`recover` checks the base against the manifest **before** writing
  anything, builds the model in a scratch folder beside ``OUT``
  (:func:`files.atomic_dir`), verifies what it wrote, and only then renames it
  to ``OUT``: a kill leaves nothing at ``OUT``.
* :func:`merge_lora` adds ``scale * B @ A`` to every LoRA target and puts the
  adapter's ``modules_to_save`` copies in place of the base's tensors.
* :func:`verify` checks a folder against a manifest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from . import files

FORMAT = "knowlm_nb.weights/1"
MANIFEST = "manifest.json"
CHUNK_MB = 1            # rows of one tensor processed at a time (fp32 bytes); larger blocks
                        # cost RSS: +20 MB at 1 MB, +40-55 MB at 4, +150 at 16 (glibc keeps freed blocks)
SHARD_MB = 2000         # default output shard size
DIFF_DTYPES = ("float32", "float16", "bfloat16")
PATCH = "__patch__."     # prefix of a fp32 diff's sparse patch tensors

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


class WeightsError(ValueError):
    """A checkpoint, diff, adapter or manifest that cannot be used as asked; the message names it."""


def mb(x: float) -> int:
    """``x`` MiB in bytes (fractions allowed)."""
    return int(x * 2**20)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise WeightsError(f"unknown dtype {name!r}")
    return dt


def single_threaded(fn):
    """Run ``fn`` with one torch thread: block-sized element-wise ops gain nothing from more,
    and on a busy machine their spinning threads made recovery 9x slower (measured)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return run


# ---------------------------------------------------------------- reading

def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size.

    A file shorter than its header promises (a download or copy cut short) is
    a :class:`WeightsError` saying so, before any tensor is read.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(head, "little")
        if n > 100_000_000 or 8 + n > size:
            raise WeightsError(f"{path}: truncated or not a safetensors file "
                               f"(header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            dtype = ST_DTYPES[info["dtype"]]
            numel = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry {name!r}") from None
        if stop - start != numel * dtype.itemsize:
            raise WeightsError(f"{path}: tensor {name!r} has {stop - start} bytes for shape "
                               f"{info['shape']} {info['dtype']}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated: the file has {size} bytes, its header needs "
                           f"{8 + n + end}; copy or download it again")
    return header


def load_bin(path: Path) -> dict:
    """A ``pytorch_model*.bin`` state dict, read with ``torch.load(weights_only=True)``.

    Anything but plain tensors (a pickle that would import or call code) is
    refused with a :class:`WeightsError`; the file is memory-mapped when it can be.
    """
    import pickle

    path = Path(path)
    kw = dict(map_location="cpu", weights_only=True)
    try:
        try:
            state = torch.load(path, mmap=True, **kw)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be mmapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, **kw)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: refused: not a plain tensor file, loading it would run "
                           f"code ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt .bin checkpoint ({exc})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path}: not a state dict of named tensors")
    return state


class Checkpoint:
    """The tensors of a checkpoint folder or file, read one tensor (or block of rows) at a time.

    Accepts ``model.safetensors``, ``model-*.safetensors`` with or without
    ``model.safetensors.index.json``, ``pytorch_model.bin`` and
    ``pytorch_model-*.bin`` (+ ``pytorch_model.bin.index.json``), or a single
    ``.safetensors`` / ``.bin`` file. Nothing is loaded until asked for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise WeightsError(f"no checkpoint at {self.path}")
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[torch.dtype, tuple]] = {}
        self._bin: tuple[Path, dict] | None = None
        self.files = self._find_files()
        for f in self.files:
            if f.suffix == ".safetensors":
                for name, info in safetensors_header(f).items():
                    if name != "__metadata__":
                        self._add(name, f, ST_DTYPES[info["dtype"]], tuple(info["shape"]))
            else:
                state = self._bin_state(f)
                for name, t in state.items():
                    self._add(name, f, t.dtype, tuple(t.shape))
        if not self.where:
            raise WeightsError(f"{self.path}: no tensors")
        self._check_index()

    def _find_files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.suffix not in (".safetensors", ".bin"):
                raise WeightsError(f"{p}: not a .safetensors or .bin checkpoint")
            return [p]
        for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
            if (p / index).is_file():
                self.index = self._read_index(p / index)
                return sorted({p / f for f in self.index.values()})
            found = sorted(p.glob(pattern))
            if found:
                self.index = None
                return found
        raise WeightsError(f"{p}: no *.safetensors or pytorch_model*.bin files")

    def _read_index(self, path: Path) -> dict:
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{path}: not a checkpoint index (no weight_map)") from None
        for name, f in weight_map.items():
            if "/" in f or "\\" in f or f.startswith("."):
                raise WeightsError(f"{path}: shard name {f!r} for {name!r} is not a plain file name")
            if not (path.parent / f).is_file():
                raise WeightsError(f"{path}: shard {f} (for {name!r}) is missing")
        return weight_map

    def _check_index(self) -> None:
        if getattr(self, "index", None) is None:
            return
        for name, f in self.index.items():
            if name not in self.where:
                raise WeightsError(f"{self.path}: the index lists {name!r} in {f}, which lacks it")

    def _add(self, name: str, f: Path, dtype, shape) -> None:
        if name in self.where:
            raise WeightsError(f"{self.path}: tensor {name!r} is in both {self.where[name].name} "
                               f"and {f.name}")
        self.where[name], self.meta[name] = f, (dtype, shape)

    def _bin_state(self, f: Path) -> dict:
        if self._bin is None or self._bin[0] != f:
            self._bin = None          # drop the previous shard first
            self._bin = (f, load_bin(f))
        return self._bin[1]

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def nbytes(self, name: str) -> int:
        dtype, shape = self.meta[name]
        return math.prod(shape) * dtype.itemsize

    def rows(self, name: str, span: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows ``span`` (start, stop) of a tensor, or all of it; a fresh tensor."""
        f = self.where[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            # opened per read: safe_open maps the whole file, and every page a block
            # touched would stay resident (and count in RSS) while the map is open
            try:
                with safe_open(str(f), framework="pt") as fh:
                    if span is None or not self.meta[name][1]:
                        return fh.get_tensor(name)
                    return fh.get_slice(name)[span[0]:span[1]]
            except Exception as exc:  # safetensors raises its own error types
                raise WeightsError(f"{f}: cannot read tensor {name!r} ({exc})") from None
        t = self._bin_state(f)[name]
        if span is not None and t.dim():
            t = t[span[0]:span[1]]
        return t.clone()

    def tensor(self, name: str) -> torch.Tensor:
        return self.rows(name)

    def close(self) -> None:
        self._bin = None


def row_spans(shape: tuple, chunk_bytes: int) -> Iterator[tuple[int, int] | None]:
    """Blocks of whole rows of about ``chunk_bytes`` (counted in fp32); ``None`` = the whole tensor."""
    if not shape:
        yield None
        return
    rows = shape[0]
    row_bytes = max(1, math.prod(shape[1:]) * 4)
    step = max(1, chunk_bytes // row_bytes)
    if rows <= step:
        yield None
        return
    for a in range(0, rows, step):
        yield (a, min(rows, a + step))


# ---------------------------------------------------------------- hashing

def as_bytes(t: torch.Tensor):
    """A tensor's bytes as a buffer (no copy for a contiguous tensor)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class TensorHash:
    """The digest of :func:`files.tensor_sha256`, fed block by block (row order)."""

    def __init__(self, dtype: torch.dtype, shape: tuple):
        import hashlib

        self.h = hashlib.sha256(f"{dtype}|{tuple(shape)}".encode())

    def update(self, block: torch.Tensor) -> None:
        self.h.update(as_bytes(block))

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def entry(dtype: torch.dtype, shape: tuple, sha: str, **more) -> dict:
    return {"dtype": dtype_name(dtype), "shape": list(shape), "sha256": sha, **more}


# ---------------------------------------------------------------- writing

class ShardWriter:
    """Writes planned tensors into safetensors shards block by block, never holding a shard.

    ``plan`` is ``[(name, dtype, shape)]`` in writing order; since every
    tensor's size is known up front, each shard's header is written first and
    the blocks are appended as they come. More than one shard gets a
    ``model.safetensors.index.json``. With ``hash=True`` the sha256 of each
    written tensor is kept in :attr:`hashes`.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, torch.dtype, tuple]],
                 shard_bytes: int, hash: bool = False):
        self.folder = Path(folder)
        self.hash = hash
        self.hashes: dict[str, str] = {}
        shards: list[list] = [[]]
        size = 0
        for item in plan:
            nbytes = math.prod(item[2]) * item[1].itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.queue = [(i, item) for i, shard in enumerate(shards) for item in shard]
        self.pos = -1
        self.fh = None
        self.total = 0
        self.weight_map: dict[str, str] = {}
        self._next()

    def _header(self, shard: list) -> bytes:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in shard:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def _next(self) -> None:
        """Move to the next planned tensor (opening its shard), skipping empty ones."""
        while True:
            if self.pos >= 0:
                name, dtype, shape = self.queue[self.pos][1]
                if self.hash:
                    self.hashes[name] = self.hasher.hexdigest()
            self.pos += 1
            if self.pos >= len(self.queue):
                self.current = None
                return
            shard_no, (name, dtype, shape) = self.queue[self.pos]
            if self.pos == 0 or self.queue[self.pos - 1][0] != shard_no:
                if self.fh:
                    self.fh.close()
                self.fh = open(self.folder / self.names[shard_no], "wb")
                self.fh.write(self._header(self.shards[shard_no]))
            self.weight_map[name] = self.names[shard_no]
            self.current = (name, dtype, shape)
            self.left = math.prod(shape) * dtype.itemsize
            self.hasher = TensorHash(dtype, shape) if self.hash else None
            if self.left:
                return

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append the next block (rows in order) of tensor ``name``."""
        if self.current is None or self.current[0] != name:
            raise WeightsError(f"internal: wrote {name!r}, expected "
                               f"{self.current[0] if self.current else 'nothing'}")
        if block.dtype != self.current[1]:
            raise WeightsError(f"internal: {name!r} block is {block.dtype}, planned {self.current[1]}")
        data = as_bytes(block)
        if data.nbytes > self.left:
            raise WeightsError(f"internal: {name!r} got more bytes than its shape holds")
        self.fh.write(data)
        if self.hasher:
            self.hasher.update(block)
        self.left -= data.nbytes
        self.total += data.nbytes
        if self.left == 0:
            self._next()

    def close(self) -> dict[str, str]:
        """Finish the shards (and the index); every planned tensor must have been written."""
        if self.current is not None:
            raise WeightsError(f"internal: tensor {self.current[0]!r} was not written whole")
        if self.fh:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None
        if len(self.names) > 1:
            files.write_json(self.folder / "model.safetensors.index.json",
                             {"metadata": {"total_size": self.total},
                              "weight_map": self.weight_map})
        return self.weight_map

    def abort(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy a model folder's non-weight files (config, tokenizer, ...) into ``dst``."""
    src = Path(src)
    if not src.is_dir():
        return []
    copied = []
    for f in sorted(src.iterdir()):
        if (not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json")
                or f.name in (MANIFEST, "adapter_config.json") or f.name.startswith(".")):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


# --------------------------------------------------------------- manifests

def read_manifest(path: str | Path) -> dict:
    """A manifest (a file, or a folder holding ``manifest.json``), checked for its format."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise WeightsError(f"no manifest at {path}")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("tensors"), dict):
        raise WeightsError(f"{path}: not a {FORMAT} manifest")
    return m


def check_tensors(ckpt: Checkpoint, expected: dict, what: str, chunk_mb: int = CHUNK_MB,
                  extra_ok: bool = True) -> int:
    """Check ``ckpt`` holds every tensor of ``expected`` with its dtype, shape and sha256.

    Raises :class:`WeightsError` naming the first mismatching tensor (sorted
    order); returns the bytes checked.
    """
    checked = 0
    for name in sorted(expected):
        want = expected[name]
        if name not in ckpt:
            raise WeightsError(f"{what} {ckpt.path} is missing tensor {name!r}")
        dtype, shape = ckpt.meta[name]
        if dtype_name(dtype) != want["dtype"] or list(shape) != list(want["shape"]):
            raise WeightsError(f"{what} tensor {name!r} is {dtype_name(dtype)} {list(shape)}, "
                               f"the manifest expects {want['dtype']} {want['shape']}")
    def digest(name: str) -> str:
        dtype, shape = ckpt.meta[name]
        h = TensorHash(dtype, shape)
        for span in row_spans(shape, mb(chunk_mb)):
            h.update(ckpt.rows(name, span))
        return h.hexdigest()

    # one tensor at a time: hashing on several threads was measured to cost ~25 MB of RSS
    # (a malloc arena per thread) for no gain on 2 busy cores
    for name in sorted(expected):
        got = digest(name)
        if got != expected[name]["sha256"]:
            raise WeightsError(f"{what} tensor {name!r} does not match the manifest (sha256 "
                               f"{got[:12]}..., expected {expected[name]['sha256'][:12]}...)"
                               + ("; is this the right base model?" if what == "base" else ""))
        checked += ckpt.nbytes(name)
    if not extra_ok:
        extra = sorted(set(ckpt.names) - set(expected))
        if extra:
            raise WeightsError(f"{what} {ckpt.path} has tensors the manifest does not list: "
                               f"{', '.join(extra[:5])}")
    return checked


@single_threaded
def verify(model: str | Path, manifest: str | Path | dict, chunk_mb: int = CHUNK_MB) -> dict:
    """Check a model folder against a manifest's ``tensors``: names, dtypes, shapes, sha256.

    Returns ``{"tensors": n, "bytes": b, "ok": True}``; a mismatch is a
    :class:`WeightsError` naming the first tensor that differs.
    """
    m = manifest if isinstance(manifest, dict) else read_manifest(manifest)
    ckpt = Checkpoint(model)
    try:
        nbytes = check_tensors(ckpt, m["tensors"], "model", chunk_mb, extra_ok=False)
    finally:
        ckpt.close()
    return {"tensors": len(m["tensors"]), "bytes": nbytes, "ok": True}


# --------------------------------------------------------------- make-diff

def patch_names(name: str) -> tuple[str, str]:
    """The diff's names for the sparse patch of tensor ``name``: flat indices and tuned values."""
    return f"{PATCH}{name}.index", f"{PATCH}{name}.value"


@single_threaded
def make_diff(base: str | Path, tuned: str | Path, out: str | Path, dtype: str = "float32",
              shard_mb: float = SHARD_MB, chunk_mb: float = CHUNK_MB) -> dict:
    """Write ``tuned - base`` to ``out`` as sharded safetensors with a manifest; return the manifest.

    ``dtype`` is the diff's dtype. ``float32`` is exact: where ``base + (tuned
    - base)`` rounds to a different fp32 number than ``tuned`` (an element that
    changed sign or size a lot, about 1.6% of them after 02's 40 steps at lr
    1e-3), the tuned value is stored in a sparse *patch* (flat index, value)
    beside the diff. ``float16``/``bfloat16`` halve the size; their max error
    ``|recovered - tuned|`` is measured and stored as ``max_abs_error``.
    Tensors only in ``tuned``, or whose shape or kind changed, are stored
    whole. Two streamed passes: the first hashes base, tuned and the would-be
    recovered tensors and counts the patch; the second writes.
    """
    if dtype not in DIFF_DTYPES:
        raise WeightsError(f"diff dtype must be one of {', '.join(DIFF_DTYPES)}, got {dtype!r}")
    ddt = parse_dtype(dtype)
    exact = ddt == torch.float32
    B, T = Checkpoint(base), Checkpoint(tuned)
    chunk = mb(chunk_mb)
    base_m, rec_m, modes, patch_n, max_err = {}, {}, {}, {}, 0.0
    start = time.perf_counter()

    def blocks(name, span):
        """(base block, tuned block, stored diff block, mismatch mask or None)."""
        b, t = B.rows(name, span), T.rows(name, span)
        d = (t.float() - b.float()).to(ddt)
        miss = (b.float() + d.float()).to(t.dtype) != t if exact else None
        return b, t, d, miss

    for name in T.names:
        tdt, tshape = T.meta[name]
        th = TensorHash(tdt, tshape)
        mode = "whole"
        if name in B and B.meta[name][1] == tshape and tdt.is_floating_point \
                and B.meta[name][0].is_floating_point:
            bdt = B.meta[name][0]
            bh, rh, mode, err, n_miss = TensorHash(bdt, tshape), TensorHash(tdt, tshape), "diff", 0.0, 0
            for span in row_spans(tshape, chunk):
                b, t, d, miss = blocks(name, span)
                bh.update(b)
                th.update(t)
                if exact:
                    n_miss += int(miss.sum())
                    continue
                if not torch.isfinite(d).all():
                    mode = "whole"
                r = (b.float() + d.float()).to(tdt)
                rh.update(r)
                err = max(err, (r.float() - t.float()).abs().max().item() if r.numel() else 0.0)
            base_m[name] = entry(bdt, tshape, bh.hexdigest())
            if mode == "diff":
                max_err = max(max_err, err)
                rec_m[name] = entry(tdt, tshape, th.hexdigest() if exact else rh.hexdigest())
                patch_n[name] = n_miss
        else:
            for span in row_spans(tshape, chunk):
                th.update(T.rows(name, span))
        if mode == "whole":
            rec_m[name] = entry(tdt, tshape, th.hexdigest())
        modes[name] = mode
    plan = []
    for n in T.names:
        tdt, shape = T.meta[n]
        plan.append((n, ddt if modes[n] == "diff" else tdt, shape))
        if patch_n.get(n):
            idx, val = patch_names(n)
            plan += [(idx, torch.int64, (patch_n[n],)), (val, tdt, (patch_n[n],))]
    out = Path(out)
    with files.atomic_dir(out) as tmp:
        w = ShardWriter(tmp, plan, mb(shard_mb), hash=True)
        try:
            for name, pdt, shape in plan:
                if name.startswith(PATCH):
                    continue
                if modes[name] == "whole":
                    for span in row_spans(shape, chunk):
                        w.write(name, T.rows(name, span))
                    continue
                idx, val = [], []
                row = math.prod(shape[1:]) if shape else 1
                for span in row_spans(shape, chunk):
                    b, t, d, miss = blocks(name, span)
                    w.write(name, d)
                    if patch_n.get(name):
                        flat = miss.reshape(-1)
                        idx.append(flat.nonzero().reshape(-1) + (span[0] * row if span else 0))
                        val.append(t.reshape(-1)[flat])
                if patch_n.get(name):
                    w.write(patch_names(name)[0], torch.cat(idx))
                    w.write(patch_names(name)[1], torch.cat(val))
            w.close()
        finally:
            w.abort()
        diff_m = {n: entry(pdt, shape, w.hashes[n],
                           mode="patch" if n.startswith(PATCH) else modes[n])
                  for n, pdt, shape in plan}
        manifest = {
            "format": FORMAT, "kind": "diff", "diff_dtype": dtype,
            "base": {n: base_m[n] for n in sorted(base_m) if modes[n] == "diff"},
            "diff": diff_m, "tensors": rec_m,
            "dropped": sorted(set(B.names) - set(T.names)),
            "stored_whole": sorted(n for n in modes if modes[n] == "whole"),
            "patched_elements": sum(patch_n.values()),
            "diff_elements": sum(math.prod(T.meta[n][1]) for n in patch_n),
            "max_abs_error": max_err, "exact": max_err == 0.0,
            "diff_bytes": w.total, "tuned_bytes": sum(T.nbytes(n) for n in T.names),
            "seconds": round(time.perf_counter() - start, 3),
        }
        copy_side_files(T.path, tmp)
        files.write_json(tmp / MANIFEST, manifest)
        check_tensors(Checkpoint(tmp), diff_m, "diff", chunk_mb)
    B.close(), T.close()
    return manifest


# ----------------------------------------------------------------- recover

def read_patch(D: Checkpoint, m: dict, name: str) -> tuple | None:
    """``(flat indices, values)`` of ``name``'s patch in diff ``D``, checked against the manifest."""
    names = patch_names(name)
    if names[0] not in m["diff"]:
        return None
    out = []
    for n in names:
        t = D.tensor(n)
        if files.tensor_sha256(t) != m["diff"][n]["sha256"]:
            raise WeightsError(f"diff tensor {n!r} does not match its manifest (corrupt download?)")
        out.append(t)
    return tuple(out)


def apply_patch(block: torch.Tensor, patch: tuple | None, span, row: int) -> torch.Tensor:
    """Put the patch's tuned values into ``block`` (rows ``span`` of a tensor with ``row`` elements a row)."""
    if patch is None:
        return block
    idx, val = patch
    lo_flat = span[0] * row if span else 0
    hi_flat = lo_flat + block.numel()
    lo, hi = torch.searchsorted(idx, torch.tensor([lo_flat, hi_flat])).tolist()
    block.view(-1)[idx[lo:hi] - lo_flat] = val[lo:hi]
    return block


@single_threaded
def recover(base: str | Path, diff: str | Path, out: str | Path, shard_mb: float = SHARD_MB,
            chunk_mb: float = CHUNK_MB) -> dict:
    """Rebuild the tuned model from ``base`` + ``diff`` into ``out``; return a summary.

    The base is checked against the diff's manifest (every tensor's dtype,
    shape and sha256) before anything is written; the model is built in a
    scratch folder beside ``out``, each diff tensor is checked as it is read,
    the written shards are verified against the manifest, and only then is the
    folder renamed to ``out``. Sums are computed in fp32 and cast to the tuned
    dtype, one block of rows at a time; a fp32 diff's patch puts back the few
    elements whose sum would round differently.
    """
    diff = Path(diff)
    m = read_manifest(diff)
    if m.get("kind") != "diff":
        raise WeightsError(f"{diff}: the manifest is not a diff's")
    start = time.perf_counter()
    B, D = Checkpoint(base), Checkpoint(diff)
    for name, want in m["diff"].items():
        if name not in D:
            raise WeightsError(f"diff {diff} is missing tensor {name!r}")
        dt, shape = D.meta[name]
        if dtype_name(dt) != want["dtype"] or list(shape) != want["shape"]:
            raise WeightsError(f"diff tensor {name!r} is {dtype_name(dt)} {list(shape)}, "
                               f"the manifest expects {want['dtype']} {want['shape']}")
    check_tensors(B, m["base"], "base", chunk_mb)
    checked = time.perf_counter()
    chunk = mb(chunk_mb)
    plan = [(n, parse_dtype(e["dtype"]), tuple(e["shape"])) for n, e in m["tensors"].items()]
    with files.atomic_dir(Path(out)) as tmp, ThreadPoolExecutor(1) as hasher:
        w = ShardWriter(tmp, plan, mb(shard_mb))
        try:
            for name, tdt, shape in plan:
                info = m["diff"][name]
                dh = TensorHash(parse_dtype(info["dtype"]), shape)
                patch = read_patch(D, m, name)
                row = math.prod(shape[1:]) if shape else 1
                hashed = None
                for span in row_spans(shape, chunk):
                    d = D.rows(name, span)
                    if hashed:
                        hashed.result()  # one block in flight: hashing overlaps the sum and write
                    hashed = hasher.submit(dh.update, d)
                    if info["mode"] == "diff":
                        r = (B.rows(name, span).float() + d.float()).to(tdt)
                        w.write(name, apply_patch(r, patch, span, row))
                    else:
                        w.write(name, d.to(tdt))
                hashed.result()
                if dh.hexdigest() != info["sha256"]:
                    raise WeightsError(f"diff tensor {name!r} does not match its manifest "
                                       "(corrupt download?)")
            w.close()
        finally:
            w.abort()
        copy_side_files(diff, tmp)
        written = time.perf_counter()
        report = verify(tmp, m, chunk_mb)
    B.close(), D.close()
    end = time.perf_counter()
    return {"tensors": report["tensors"], "bytes": report["bytes"],
            "check_base_s": round(checked - start, 3), "write_s": round(written - checked, 3),
            "verify_s": round(end - written, 3), "seconds": round(end - start, 3),
            "exact": m.get("exact"), "max_abs_error": m.get("max_abs_error")}


def naive_recover(base: str | Path, diff: str | Path, out: str | Path) -> dict:
    """The original's way, for comparison: load base and diff whole, add, save one file.

    No manifest check, no streaming: memory grows with the whole model.
    """
    from safetensors.torch import save_file

    B, D = Checkpoint(base), Checkpoint(diff)
    m = read_manifest(diff)
    base_sd = {n: B.tensor(n) for n in B.names}
    diff_sd = {n: D.tensor(n) for n in D.names}
    out_sd = {}
    for name, info in m["tensors"].items():
        tdt = parse_dtype(info["dtype"])
        if m["diff"][name]["mode"] == "diff":
            r = (base_sd[name].float() + diff_sd[name].float()).to(tdt)
            idx, val = patch_names(name)
            if idx in diff_sd:
                r.view(-1)[diff_sd[idx]] = diff_sd[val]
            out_sd[name] = r
        else:
            out_sd[name] = diff_sd[name].to(tdt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(out_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"tensors": len(out_sd)}


# -------------------------------------------------------------- merge-lora

def read_adapter(adapter: str | Path) -> tuple[dict, dict]:
    """``(adapter_config, tensors)`` of a PEFT LoRA adapter folder (safetensors or .bin)."""
    adapter = Path(adapter)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"no LoRA adapter at {adapter} (adapter_config.json missing)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise WeightsError(f"{adapter}: peft_type {cfg.get('peft_type')!r}, only LORA merges here")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise WeightsError(f"{adapter}: {key}=true is not supported by merge-lora")
    if cfg.get("bias", "none") != "none":
        raise WeightsError(f"{adapter}: bias={cfg['bias']!r}; only bias='none' adapters merge here")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise WeightsError(f"{adapter}: rank_pattern/alpha_pattern are not supported by merge-lora")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            ck = Checkpoint(adapter / name)
            tensors = {n: ck.tensor(n) for n in ck.names}
            ck.close()
            return cfg, tensors
    raise WeightsError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin")


def adapter_updates(cfg: dict, tensors: dict, model_names) -> tuple[dict, dict, float]:
    """``(lora, replace, scale)``: model tensor name -> (B, A), model tensor name -> whole copy.

    Adapter keys look like ``base_model.model.<module>.lora_A.weight``;
    ``modules_to_save`` copies are saved as ``base_model.model.<module>.weight``.
    """
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    prefix = "base_model.model."
    lora, replace, parts = {}, {}, {}
    for key, t in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if name.endswith(tag):
                parts.setdefault(name[:-len(tag)] + ".weight", {})[part] = t
                break
        else:
            if ".lora_" in name or ".lora_embedding_" in name or ".lora_magnitude" in name:
                raise WeightsError(f"adapter tensor {key!r}: not a LoRA linear update merge-lora knows")
            if name not in model_names:
                raise WeightsError(f"adapter tensor {key!r} replaces {name!r}, which the model lacks")
            replace[name] = t
    for name, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise WeightsError(f"adapter has {'/'.join(ab)} but not both for {name!r}")
        if name not in model_names:
            raise WeightsError(f"adapter targets {name!r}, which the model lacks")
        lora[name] = (ab["lora_B"], ab["lora_A"])
    return lora, replace, scale


@single_threaded
def merge_lora(model: str | Path, adapter: str | Path, out: str | Path, shard_mb: int = SHARD_MB,
               chunk_mb: int = CHUNK_MB) -> dict:
    """Merge a LoRA adapter into ``model``, streamed, into ``out``; return its manifest.

    For every target ``W``: ``W + (B @ A) * lora_alpha / r``, computed in fp32
    a block of rows at a time and cast back to ``W``'s dtype; the adapter's
    ``modules_to_save`` copies (03 trains the embeddings and the head whole)
    replace the model's tensors. The result (config and tokenizer copied) gets
    its own ``manifest.json`` and is verified before the rename.
    """
    cfg, tensors = read_adapter(adapter)
    M = Checkpoint(model)
    lora, replace, scale = adapter_updates(cfg, tensors, set(M.names))
    for name, (b, a) in lora.items():
        shape = M.meta[name][1]
        if (b.shape[0], a.shape[1]) != tuple(shape) or b.shape[1] != a.shape[0]:
            raise WeightsError(f"adapter for {name!r}: B {list(b.shape)} @ A {list(a.shape)} "
                               f"does not fit the weight {list(shape)}")
    for name, t in replace.items():
        if tuple(t.shape) != M.meta[name][1]:
            raise WeightsError(f"adapter copy of {name!r} is {list(t.shape)}, the model's is "
                               f"{list(M.meta[name][1])}")
    start = time.perf_counter()
    chunk = mb(chunk_mb)
    plan = [(n, *M.meta[n]) for n in M.names]
    with files.atomic_dir(Path(out)) as tmp:
        w = ShardWriter(tmp, plan, mb(shard_mb), hash=True)
        try:
            for name, dt, shape in plan:
                if name in replace:
                    w.write(name, replace[name].to(dt))
                    continue
                for span in row_spans(shape, chunk):
                    x = M.rows(name, span)
                    if name in lora:
                        b, a = lora[name]
                        b = b.float() if span is None else b[span[0]:span[1]].float()
                        x = (x.float() + (b @ a.float()) * scale).to(dt)
                    w.write(name, x)
            w.close()
        finally:
            w.abort()
        manifest = {"format": FORMAT, "kind": "merge",
                    "tensors": {n: entry(dt, shape, w.hashes[n]) for n, dt, shape in plan},
                    "merged": sorted(lora), "replaced": sorted(replace), "scale": scale,
                    "adapter_sha256": files.sha256_files(sorted(
                        p for p in Path(adapter).iterdir() if p.is_file())),
                    "seconds": round(time.perf_counter() - start, 3)}
        copy_side_files(M.path, tmp)
        files.write_json(tmp / MANIFEST, manifest)
        verify(tmp, manifest, chunk_mb)
    M.close()
    return manifest


# ------------------------------------------------------------ teaching aids

def weight_sum(path: str | Path, dtype: torch.dtype = torch.float32, reverse: bool = False) -> float:
    """The original's "integrity check": the sum of every weight, accumulated in ``dtype``.

    Kept to show why it is weak: the value depends on the accumulation order
    (``reverse``) and overflows to ``inf`` in fp16, and many different models
    share a sum.
    """
    ck = Checkpoint(path)
    names = sorted(ck.names, reverse=reverse)
    total = torch.zeros((), dtype=dtype)
    for name in names:
        total = total + ck.tensor(name).to(dtype).sum(dtype=dtype)
    ck.close()
    return total.item()


def synthetic_pair(out: str | Path, n_tensors: int = 8, tensor_mb: float = 16, width: int = 1024,
                   noise: float = 1e-3, seed: int = 0, shard_mb: int = SHARD_MB) -> tuple[Path, Path]:
    """``(base, tuned)`` safetensors folders of ``n_tensors`` fp32 matrices, written streamed.

    The last tensor is twice as large as the others (it plays the embedding
    table); tuned = base + ``noise`` * N(0, 1), as continued pretraining moves
    weights a little. For benchmarks and the kill test.
    """
    out = Path(out)
    rows = max(1, int(tensor_mb * mb(1)) // (width * 4))
    plan = [(f"layers.{i}.weight", torch.float32, (rows * (2 if i == n_tensors - 1 else 1), width))
            for i in range(n_tensors)]
    paths = []
    for which in ("base", "tuned"):
        folder = out / which
        folder.mkdir(parents=True, exist_ok=True)
        w = ShardWriter(folder, plan, mb(shard_mb))
        for i, (name, dt, shape) in enumerate(plan):
            for span in row_spans(shape, mb(CHUNK_MB)):
                a, b = span or (0, shape[0])
                g = torch.Generator().manual_seed(seed * 1000 + i * 7919 + a)
                x = torch.randn((b - a, width), generator=g) * 0.02
                if which == "tuned":
                    g2 = torch.Generator().manual_seed(seed * 1000 + i * 7919 + a + 1)
                    x = x + noise * torch.randn((b - a, width), generator=g2)
                w.write(name, x)
        w.close()
        paths.append(folder)
    return paths[0], paths[1]


def rss_trace(argv: list[str], interval: float = 0.02, env: dict | None = None) -> dict:
    """Run ``argv`` in a subprocess and sample its RSS; ``{"t", "rss_mb", "peak_mb", "seconds", "cpu_s"}``.

    ``peak_mb`` is the kernel's own high-water mark of the child's memory
    (``VmHWM`` in ``/proc/PID/status``, read at every sample), so a spike
    between two samples is not missed. (``ru_maxrss`` would not do: a forked
    child inherits its parent's peak, e.g. a 1.6 GB notebook kernel's.)
    """
    import subprocess

    import psutil

    start = time.perf_counter()
    import tempfile

    out_fh, err_fh = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # a pipe could fill and block
    proc = subprocess.Popen(argv, stdout=out_fh, stderr=err_fh, env={**os.environ, **(env or {})})
    ps = psutil.Process(proc.pid)
    ts, rss, hwm = [], [], 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while True:
        try:
            if ps.status() == psutil.STATUS_ZOMBIE:
                break
            rss.append(ps.memory_info().rss / 2**20)
            ts.append(time.perf_counter() - start)
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) / 1024)
        except (psutil.NoSuchProcess, OSError):
            break
        time.sleep(interval)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_fh.seek(0), err_fh.seek(0)
    out, err = out_fh.read(), err_fh.read()
    out_fh.close(), err_fh.close()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise WeightsError(f"{' '.join(map(str, argv[:4]))} ... failed ({proc.returncode}): "
                           f"{err.decode(errors='replace')[-800:]}")
    return {"t": ts, "rss_mb": rss, "peak_mb": max([hwm, *rss]), "seconds": seconds,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "stdout": out.decode(errors="replace")}


def stand_in_tuned(base: str | Path, out: str | Path, steps: int = 30, lr: float = 1e-3,
                   seq_len: int = 128, batch: int = 8, seed: int = 0) -> dict:
    """A cheap stand-in for 02's continued-pretrained model: ``steps`` of plain AdamW on the corpus.

    For a standalone run of notebook 04 when 02's (DeepSpeed) model is missing:
    same recipe in miniature, next-token loss on the sample corpus, no DeepSpeed.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from . import tiny

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    texts = list(tiny.iter_texts(files.find_files("data_samples/corpus/*.jsonl")))
    ids = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        x = blocks[torch.randint(len(blocks), (batch,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with files.atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1]}


def stand_in_adapter(base: str | Path, out: str | Path, steps: int = 20, mix_total: int = 400,
                     profile: str = "tiny", seed: int = 0) -> dict:
    """A quick stand-in for 03's adapter: ``steps`` of LoRA with 03's settings (modules_to_save too)."""
    from . import config, instruct

    p = config.notebook_params(profile, "03")
    tok, model = instruct.load_base(base)
    train, _, _ = instruct.build_mix(mix_total, seed, copy_share=p["copy_share"],
                                     names=p["fresh_names"])
    rows, _ = instruct.tokenize_all(tok, train, instruct.load_template(p["prompt_template"]),
                                    p["cutoff_len"], p["train_on_inputs"])
    model = instruct.lora_model(model, p["lora_r"], p["lora_alpha"], 0.0, p["target_modules"],
                                False, p["modules_to_save"])
    res = instruct.train_lora(model, tok, rows, [], out, p["learning_rate"], steps,
                              p["micro_batch"], warmup_steps=2, seed=seed, progress=False)
    return {"steps": res["steps"], "adapter_bytes": res["adapter_bytes"]}


def ensure_inputs(cfg, show=print) -> dict:
    """Build what notebooks 00, 02 and 03 would have written for 04, if it is missing, and say so.

    Only paths left at their default ("" = from ``workdir``) are built: 00's
    base by 00's own function (``tiny.build_zoo``); 02's model and 03's adapter
    are too slow to rebuild here (DeepSpeed, 10 minutes of tuning), so cheap
    stand-ins are made instead (:func:`stand_in_tuned`, :func:`stand_in_adapter`).
    Returns ``{parameter: what was built}``.
    """
    from . import config, tiny

    defaults = {k: Path(v) for k, v in config.upstream_paths("04", cfg.workdir).items()}

    def default(name: str) -> bool:  # left empty, or the upstream path the batch runner passes
        return not cfg.params[name] or cfg.path(name) == defaults[name]

    built = {}
    base = cfg.path("base_model")
    if default("base_model") and not (base / "config.json").is_file():
        p00 = config.notebook_params(config.BASE_PROFILE, "00")
        show(f"notebook 00's base model is missing: building it at tiny scale in {base.parent} "
             "(tiny.build_zoo)")
        tiny.build_zoo(base.parent, verbose=False, **tiny.zoo_settings(p00))
        built["base_model"] = "00's tiny.build_zoo"
    if not cfg.diff_path:
        tuned = cfg.path("tuned_model")
        if default("tuned_model") and not (tuned / "config.json").is_file():
            tuned = cfg.workdir / "04" / "stand_in_tuned"
            if not (tuned / "config.json").is_file():
                show("notebook 02's continued-pretrained model is missing: making a STAND-IN "
                     f"(30 plain AdamW steps of 00's base on the corpus, no DeepSpeed) at {tuned}")
                stand_in_tuned(base, tuned)
            built["tuned_model"] = str(tuned)
    adapter = cfg.path("adapter_path")
    if default("adapter_path") and not (adapter / "adapter_config.json").is_file():
        adapter = cfg.workdir / "04" / "stand_in_adapter"
        if not (adapter / "adapter_config.json").is_file():
            show("notebook 03's LoRA adapter is missing: making a STAND-IN (20 LoRA steps with "
                 f"03's settings, embeddings and head in modules_to_save) at {adapter}")
            stand_in_adapter(cfg.path("adapter_base"), adapter)
        built["adapter_path"] = str(adapter)
    return built


def scale_figures(parameters: float = 13.0e9, vocab: int = 32000, hidden: int = 5120,
                  chunk_mb: float = CHUNK_MB, imports_mb: float = 250.0) -> dict:
    """What a diff release of a model this size weighs, and what recovering it needs, in GiB.

    ``original_ram_gb``: the original script's two whole fp32 models in RAM.
    ``streamed_ram_gb``: imports plus three blocks of ``chunk_mb`` (base, diff,
    sum); ``largest_tensor_gb``: the embedding table in fp32, what a
    tensor-at-a-time tool without row blocks would need at least.
    """
    gib = 2**30
    return {"parameters": parameters,
            "diff_fp32_gb": parameters * 4 / gib, "diff_fp16_gb": parameters * 2 / gib,
            "original_ram_gb": 2 * parameters * 4 / gib,
            "largest_tensor_gb": vocab * hidden * 4 / gib,
            "streamed_ram_gb": (imports_mb + 3 * chunk_mb) * 2**20 / gib}


# --------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.weights",
                                 description="Weight diffs, streamed recovery, LoRA merge, verify.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-diff", help="write tuned - base with a manifest")
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=DIFF_DTYPES)
    for name, text in (("recover", "base + diff, checked before and after"),
                       ("recover-naive", "the original's whole-model way (for comparison)")):
        p = sub.add_parser(name, help=text)
        for arg in ("--base", "--diff", "--out"):
            p.add_argument(arg, required=True)
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("verify", help="check a model folder against a manifest")
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    for name in ("make-diff", "recover", "merge-lora"):
        s = sub.choices[name]
        s.add_argument("--shard-mb", type=float, default=SHARD_MB)
        s.add_argument("--chunk-mb", type=float, default=CHUNK_MB)
    args = ap.parse_args(argv)
    try:
        if args.command == "make-diff":
            m = make_diff(args.base, args.tuned, args.out, args.dtype, args.shard_mb, args.chunk_mb)
            res = {k: m[k] for k in ("diff_dtype", "exact", "max_abs_error", "diff_bytes",
                                     "patched_elements", "stored_whole", "dropped", "seconds")}
        elif args.command == "recover":
            res = recover(args.base, args.diff, args.out, args.shard_mb, args.chunk_mb)
        elif args.command == "recover-naive":
            res = naive_recover(args.base, args.diff, args.out)
        elif args.command == "merge-lora":
            m = merge_lora(args.model, args.adapter, args.out, args.shard_mb, args.chunk_mb)
            res = {k: m[k] for k in ("scale", "seconds")} | {"merged": len(m["merged"]),
                                                              "replaced": m["replaced"]}
        else:
            res = verify(args.model, args.manifest)
    except (WeightsError, files.FilesError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
