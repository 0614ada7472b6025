"""Files that must never be half-written or used by two processes at once.

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: a unique temporary file beside the
  target, fsync, ``os.replace``, fsync of the directory; a crash (or a full disk) leaves the
  old file or the new one, never a mixture, and never an empty file where a digest was.
* :func:`run_lock`: an exclusive, non-blocking ``fcntl.flock`` on ``<run_dir>/.lock`` held by
  every operation on a run directory (a run, a resume, a grid's skip / set-aside / resume); a
  second process gets a :class:`~harness.errors.RunInUse`. Re-entrant within one process (a
  grid cell holds it while it decides, then resumes under it).
* :func:`key_lock`: a blocking ``flock`` per cache key (``<lock_dir>/<key>.lock``): two
  processes that need the same cache entry compute it once; the second waits, then reads it.
* :func:`content_sha256` / :func:`tensors_sha256`: content hashes stored inside cache files and
  checked on read, so a file altered with its header intact is detected (and recomputed).

The lock is released by the kernel when the process dies (``flock`` belongs to the open file),
so a killed run never leaves a stale lock behind. A lock is only held once the path still names
the locked file: a directory renamed (set aside) by the holder is never taken for its successor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from harness.errors import RunInUse, UserError

LOCK_NAME = ".lock"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """Whether ``text`` is a lowercase hex SHA-256 digest (64 characters)."""
    return bool(_SHA256.fullmatch(text))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a unique temporary file beside it,
    which is fsync'd and renamed over ``path``; then the directory is fsync'd. On any error
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (:func:`atomic_write_with`)."""
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def content_sha256(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name);
    the tensors are read on the CPU, contiguous."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: (st_dev, st_ino) of the lock files this process holds (a nested run_lock passes through)
_HELD: set[tuple[int, int]] = set()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _still_named(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not renamed away or replaced)."""
    try:
        return _identity(os.stat(path)) == _identity(os.fstat(fd))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _flock(path: Path, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (created if absent); yields False when
    ``blocking`` is off and another open file holds it. A lock taken on a file that was
    renamed or replaced meanwhile is dropped and taken again on what ``path`` names now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        if _still_named(path, fd):
            break
        os.close(fd)
    held = _identity(os.fstat(fd))
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is a courtesy for the error message; the lock is what counts
        _HELD.add(held)
        yield True
    finally:
        _HELD.discard(held)
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _held_here(path: Path) -> bool:
    """Whether this process already holds the lock of the file ``path`` names."""
    try:
        return _identity(os.stat(path)) in _HELD
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the run directory ``run_dir`` for the ``with`` body; if another process
    holds it, a one-line :class:`RunInUse` (no waiting). Re-entrant: a ``with`` inside one that
    holds the same directory's lock passes straight through."""
    path = Path(run_dir) / LOCK_NAME
    if _held_here(path):
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            got = stack.enter_context(_flock(path, blocking=False))
        except FileNotFoundError as exc:
            raise UserError(f"run directory {run_dir} does not exist (moved or removed while "
                            f"it was being opened); launch again") from exc
        if not got:
            holder = _holder(path)
            raise RunInUse(f"run directory {run_dir} is in use by another keh process"
                           f"{holder}; wait for it to finish, or choose another --run-id or "
                           f"--out", run_dir=Path(run_dir), holder=holder)
        yield


@contextlib.contextmanager
def key_lock(lock_dir: Path, keys: Iterable[str]) -> Iterator[None]:
    """Blocking exclusive locks on the cache ``keys`` (sorted, so two processes asking for
    overlapping sets cannot deadlock), files ``lock_dir/<key>.lock``."""
    locks = Path(lock_dir)
    locks.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for key in sorted(set(keys)):
            if not re.fullmatch(r"[A-Za-z0-9._-]+", key):
                raise ValueError(f"cache key {key!r} is not a plain file name")
            stack.enter_context(_flock(locks / f"{key}.lock", blocking=True))
        yield
