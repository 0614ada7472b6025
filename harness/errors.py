"""Errors the CLI turns into one clear line and a non-zero exit (no traceback)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: unknown name, malformed data or hparams, impossible request.

    The message must say what is wrong, where (file, record index, field) and what to do.
    """


class DataError(UserError):
    """A data file is missing or one of its records is malformed."""

    def __init__(self, path: object, message: str, index: int | None = None,
                 field: str | None = None) -> None:
        where = f"{path}"
        if index is not None:
            where += f", record {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.index, self.field = path, index, field


class RunInUse(UserError):
    """Another process holds the run directory's lock (:func:`harness.cachefiles.run_lock`).
    ``holder``: `` (pid N)`` where the lock file names it, else empty."""

    def __init__(self, message: str, run_dir: Path, holder: str = "") -> None:
        super().__init__(message)
        self.run_dir, self.holder = run_dir, holder


#: errors of a write that a resume can recover from: disk full, quota, file size limit,
#: read-only file system, an I/O error of the device
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) name it


def write_failure(exc: BaseException | None) -> tuple[str, str | None] | None:
    """(the system's message, the file if known) when ``exc``, or an exception it was raised
    from, is a failed write of :data:`WRITE_ERRNOS`: an ``OSError`` with that errno, or a
    library's own error that carries it (safetensors' ``SafetensorError: Error while
    serializing: I/O error: No space left on device (os error 28)``); None for anything else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno in WRITE_ERRNOS:
                return os.strerror(exc.errno), exc.filename
        else:
            text = str(exc)
            codes = [int(c) for c in _OS_ERROR.findall(text)]
            codes += [c for c in WRITE_ERRNOS if os.strerror(c) in text]
            for code in codes:
                if code in WRITE_ERRNOS:
                    return os.strerror(code), None
        exc = exc.__cause__ or exc.__context__
    return None
