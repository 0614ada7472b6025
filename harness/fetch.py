"""Downloading one data file: resumable over HTTP ``Range``, checked by SHA-256, converted into
the form keh reads, then moved into place atomically.

A download goes to ``<data dir>/.partial/<path>`` first; a later fetch sends ``Range:
bytes=<size>-`` and appends when the server answers 206 (it starts again on 200). Nothing
reaches ``<data dir>/<path>`` unless its SHA-256 matches the pin (or, for an unpinned file,
it is recorded in ``<data dir>/SHA256SUMS``). Pickled downloads are read only after their own
SHA-256 matched, by an unpickler that refuses every global (built-in lists, dicts, strings
and numbers only).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import pickle
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from harness.cachefiles import atomic_write_bytes, atomic_write_text
from harness.datafiles import DataFile, Source
from harness.errors import UserError

PARTIAL = ".partial"
SUMS = "SHA256SUMS"
CHUNK = 1 << 16
TIMEOUT_S = 60


class NotPublished(UserError):
    """The server has no such file (HTTP 404)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(root: Path) -> dict[str, str]:
    """``<root>/SHA256SUMS`` as {relative path: sha256} (``sha256sum`` format; "./" dropped)."""
    path = root / SUMS
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            out[parts[1].strip().lstrip("*").removeprefix("./")] = parts[0].lower()
    return out


def record_sum(root: Path, rel: str, digest: str) -> None:
    """Write (or replace) the line of ``rel`` in ``<root>/SHA256SUMS``."""
    sums = read_sums(root)
    sums[rel] = digest
    atomic_write_text(root / SUMS, "".join(f"{h}  ./{p}\n" for p, h in sorted(sums.items())))


def download(url: str, part: Path, progress: Callable[[int, int | None], None] | None = None
             ) -> Path:
    """Fetch ``url`` into ``part``, continuing a partial file with an HTTP Range request."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "keh-data-fetch"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part file is whole
            return part
        if exc.code == 404:
            raise NotPublished(f"{url}: HTTP 404, no such file") from exc
        raise UserError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL or --mirror and "
                        f"run `keh data fetch` again") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"{url}: {getattr(exc, 'reason', exc)}; check the network or --mirror "
                        f"and run `keh data fetch` again (a partial download is kept and "
                        f"continued)") from exc
    with response:
        resumed = bool(have) and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(
                f"bytes {have}-"):
            part.unlink()
            raise UserError(f"{url}: the server answered the resume request with another "
                            f"range ({response.headers.get('Content-Range')}); the partial "
                            f"download was removed, run `keh data fetch` again")
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        done = have if resumed else 0
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
        except (OSError, http.client.HTTPException) as exc:
            raise UserError(f"{url}: transfer broke off after {done} bytes ({exc}); run `keh "
                            f"data fetch` again to continue it") from exc
    if total is not None and done < total:  # the connection closed early, without an error
        raise UserError(f"{url}: transfer broke off after {done} bytes of {total}; run `keh "
                        f"data fetch` again to continue it")
    return part


class _BuiltinsOnly(pickle.Unpickler):
    """An unpickler that constructs nothing but built-in containers, strings and numbers."""

    def find_class(self, module: str, name: str) -> type:
        raise UserError(f"refusing to unpickle {module}.{name}: only lists, dicts, strings and "
                        f"numbers are accepted")


def pickle_records_to_jsonl(raw: bytes, where: str) -> bytes:
    """A pickled list of dicts as JSON lines (UTF-8, not ASCII-escaped)."""
    try:
        records = _BuiltinsOnly(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{where}: not a readable pickle of records ({exc})") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{where}: expected a pickled list of records")
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def convert(source: Source, downloaded: Path) -> bytes:
    """The bytes keh reads, made from a verified download."""
    if source.convert is None:
        return downloaded.read_bytes()
    if source.convert == "zip-member":
        try:
            with zipfile.ZipFile(downloaded) as z:
                return z.read(str(source.member))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise UserError(f"{source.url}: no member {source.member} in the archive "
                            f"({exc})") from exc
    if source.convert == "pickle-records":
        return pickle_records_to_jsonl(downloaded.read_bytes(), source.url)
    raise ValueError(f"unknown conversion {source.convert!r}")


def _prune(directory: Path, top: Path) -> None:
    """Remove ``directory`` and its parents up to ``top`` (inclusive) while they are empty."""
    while directory.is_relative_to(top) and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent


def fetch_file(entry: DataFile, root: Path, mirror: str | None = None,
               progress: Callable[[int, int | None], None] | None = None) -> str:
    """Download ``entry`` into ``root`` (from ``mirror`` when given) and check it; return what
    was done, in words. Raises :class:`UserError` when the file cannot be fetched or does not
    match its pin (the file in place, if any, is left untouched)."""
    if mirror:
        source = Source(f"{mirror.rstrip('/')}/{entry.path}", entry.sha256)
    elif entry.source is None:
        raise UserError(f"{entry.path} is not published at a plain URL (EasyEdit's archive on "
                        f"Google Drive): fetch it from a mirror (--mirror URL) or copy it "
                        f"into {root}")
    else:
        source = entry.source
    part = root / PARTIAL / entry.path
    download(source.url, part, progress)
    got = sha256_file(part)
    if source.sha256 and got != source.sha256:
        part.unlink()
        raise UserError(f"{source.url} has SHA-256 {got}, expected {source.sha256}: the "
                        f"transfer was corrupted or the published file changed; the download "
                        f"was removed, run `keh data fetch` again or use --mirror")
    data = convert(source, part)
    digest = hashlib.sha256(data).hexdigest()
    if entry.sha256 and digest != entry.sha256:
        part.unlink()
        raise UserError(f"{entry.path} from {source.url} has SHA-256 {digest}, expected "
                        f"{entry.sha256} (the copy keh was tested with); the download was "
                        f"removed; get the pinned file from a mirror (--mirror URL)")
    dest = root / entry.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, data)
    part.unlink()
    _prune(part.parent, root / PARTIAL)
    record_sum(root, entry.path, digest)
    if entry.sha256:
        return f"fetched from {source.url}, SHA-256 verified"
    return (f"fetched from {source.url}; not pinned: SHA-256 {digest} recorded in "
            f"{root / SUMS}")
