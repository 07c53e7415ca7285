"""File I/O every stage shares: JSONL with file:line errors, globbing, hashing, one atomic write.

* :func:`iter_jsonl` / :func:`read_jsonl` read JSON Lines and name ``file:line``
  for invalid UTF-8 or JSON; :func:`write_jsonl` writes them atomically.
* :func:`find_files` globs relative to the repository root and refuses an
  empty match.
* :func:`sha256_file`, :func:`sha256_files` hash bytes; :func:`weights_hash`
  hashes every tensor of a safetensors folder (name, dtype, shape, bytes),
  which is exact for any dtype, unlike a sum of the weights.
* :class:`AtomicFile` is the project's one atomic write: data goes to a
  scratch file beside the target and is renamed over it on ``commit``; on
  ``abort`` (or an exception inside ``with``) the scratch file is removed and
  the target is left as it was. :func:`atomic_dir` does the same for a whole
  folder. Both give their outputs the permissions the process's umask asks for
  (``0644`` files, ``0755`` folders under ``022``), not ``mkstemp``'s ``0600``.
"""
from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import ROOT

CHUNK = 1 << 20  # bytes read at a time when hashing a file


class FilesError(ValueError):
    """A file that cannot be read as asked; the message names it (and the line)."""


# ------------------------------------------------------------------ reading

def find_files(pattern: str, root: Path = ROOT) -> list[Path]:
    """Files matching ``pattern`` (relative to ``root`` unless absolute), sorted; none is an error."""
    base = Path(pattern)
    full = str(base if base.is_absolute() else Path(root) / base)
    found = sorted(Path(p) for p in globlib.glob(full, recursive=True) if Path(p).is_file())
    if not found:
        raise FilesError(f"no files match {pattern!r}")
    return found


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for every non-blank line of a JSONL file.

    Invalid UTF-8 or JSON is a :class:`FilesError` naming ``file:line``.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FilesError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise FilesError(f"{path}:{lineno}: not JSON ({exc.msg})") from None


def read_jsonl(path: Path) -> list:
    """Every record of a JSONL file, in order."""
    return [rec for _, rec in iter_jsonl(path)]


# ------------------------------------------------------------------ hashing

def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Iterable[Path]) -> str:
    """One SHA-256 over the names and bytes of ``files``, in the order given."""
    h = hashlib.sha256()
    for path in files:
        h.update(Path(path).name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
    return h.hexdigest()


def tensor_sha256(tensor) -> str:
    """SHA-256 of one tensor's dtype, shape and bytes (exact for fp32, fp16 and bf16 alike)."""
    import torch

    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_hash(model_dir: Path) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in a folder's ``*.safetensors``."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FilesError(f"no .safetensors files in {model_dir}")
    h = hashlib.sha256()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in sorted(fh.keys()):
                t = fh.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------ atomic writes

def umask() -> int:
    """The process's umask, read without changing it (``/proc``), else by a set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


class AtomicFile:
    """A file written under a scratch name beside ``path`` and renamed over it on :meth:`commit`.

    ::

        with AtomicFile(path) as fh:      # commit on success, abort on error
            fh.write(b"...")

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8). A reader of ``path`` sees the old
    file or the whole new one, never a part. The new file's permissions follow
    the umask (``0644`` under ``022``).
    """

    def __init__(self, path: Path, mode: str = "wb"):
        if mode not in ("wb", "w"):
            raise ValueError(f"AtomicFile mode must be 'wb' or 'w', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.scratch = Path(tmp)
        os.chmod(fd, 0o666 & ~umask())
        self.fh = os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
        self.done = False

    def write(self, data) -> int:
        return self.fh.write(data)

    def commit(self) -> Path:
        """Flush, fsync and rename the scratch file over ``path``."""
        if self.done:
            return self.path
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.scratch, self.path)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.path

    def abort(self) -> None:
        """Drop the scratch file; ``path`` is untouched."""
        if not self.fh.closed:
            self.fh.close()
        self.scratch.unlink(missing_ok=True)
        self.done = True

    def __enter__(self):
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with AtomicFile(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with AtomicFile(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, keys sorted) to ``path`` atomically."""
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent, sort_keys=True))


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """Write one JSON record per line to ``path`` atomically."""
    with AtomicFile(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``out``; on success it replaces ``out`` whole.

    On any error (or a kill) the scratch folder, a hidden ``.NAME-*`` sibling,
    never appears at ``out``; on an error it is removed and ``out`` is left as
    it was. The folder gets the umask's permissions (``0755`` under ``022``),
    and so does every file written into it: a library that writes ``0600``
    (``save_pretrained``'s ``model.safetensors``) is widened to the umask's
    ``0644``, so a job running as another user can read the output.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        _widen_to_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-old-"))
            os.replace(out, old / out.name)  # move aside first, so ``out`` is never half-deleted
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _widen_to_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` at least the umask's default permissions."""
    um = umask()
    for path in Path(folder).rglob("*"):
        if path.is_symlink():
            continue
        default = (0o777 if path.is_dir() else 0o666) & ~um
        mode = path.stat().st_mode & 0o7777
        if mode | default != mode:
            os.chmod(path, mode | default)
