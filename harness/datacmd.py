"""``keh data list`` and ``keh data fetch [SUITE...]``: what the data directory holds, and
getting what it lacks (:mod:`harness.datafiles` is the table, :mod:`harness.fetch` the
transfer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from harness.datafiles import CONVERSIONS, DataFile, files_of
from harness.errors import UserError
from harness.fetch import NotPublished, fetch_file, read_sums, sha256_file
from harness.paths import data_dir_origin


def count_records(path: Path) -> int | None:
    """Records in a JSON list or JSON-lines file; None for text (or unreadable JSON)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return len(data) if isinstance(data, list) else 1
    return None


def default_files() -> dict[str, list[str]]:
    """Per suite, the files a run reads when ``--data`` is not given, in order of preference."""
    from suites import counterfact, zsre

    return {"counterfact": counterfact.DEFAULT_FILES, "zsre": zsre.DEFAULT_FILES}


def status(entry: DataFile, root: Path, sums: dict[str, str]) -> dict[str, Any]:
    """One row of ``keh data list``: whether the file is there (under ``root``, which the
    listing names) and whether its hash checks out; a missing file shows its pinned hash and
    record count."""
    path = root / entry.path
    row: dict[str, Any] = {"suite": entry.suite, "path": entry.path, "format": entry.fmt,
                           "what": entry.what}
    if not path.is_file():
        how = "keh data fetch" if entry.source else "a mirror (--mirror) or by hand"
        return {**row, "status": f"missing (get it with {how})", "sha256": entry.sha256 or "",
                "records": entry.records}
    digest = sha256_file(path)
    expected = entry.sha256 or sums.get(entry.path)
    if expected is None:
        state = "present, not pinned (no recorded SHA-256)"
    elif digest == expected:
        state = "ok" if entry.sha256 else "ok (SHA-256 recorded at fetch, not pinned)"
    else:
        state = f"SHA-256 MISMATCH (expected {expected[:12]}...)"
    return {**row, "status": state, "sha256": digest, "records": count_records(path)}


def list_data(directory: str | None = None, suites: list[str] | None = None,
              out: Any = None) -> int:
    """Print every known data file of ``suites``: found where, SHA-256, records, format, and
    which file each suite reads by default. Exit status 1 if a present file fails its hash."""
    out = out or sys.stdout
    root, origin = data_dir_origin(directory)
    sums = read_sums(root)
    print(f"data dir: {root} ({origin})", file=out)
    rows = [status(e, root, sums) for e in files_of(suites)]
    defaults = default_files()
    bad = 0
    for suite in dict.fromkeys(r["suite"] for r in rows):
        reads = next((f for f in defaults.get(suite, []) if (root / f).is_file()), None)
        note = f"; a run reads {reads}" if reads else ""
        print(f"\n{suite}{note}", file=out)
        for r in (r for r in rows if r["suite"] == suite):
            n = "–" if r["records"] is None else f"{r['records']:,}"
            state = r["status"]
            if reads and state.startswith("missing") and r["path"] in defaults[suite]:
                state = f"not needed (a run reads {reads}; keh data fetch --all gets it)"
            print(f"  {r['path']}: {state}", file=out)
            print(f"      {r['what']}; {r['format']}; records {n}; sha256 "
                  f"{r['sha256'] or '–'}", file=out)
            bad += r["status"].startswith("SHA-256 MISMATCH")
    return 1 if bad else 0


def unreadable(suites: list[str] | None, root: Path) -> list[str]:
    """One line per suite of ``suites`` that a run could not read from ``root``: counterfact
    and zsRE need one of their default files, the others every required file."""
    defaults = default_files()
    out = []
    for suite in dict.fromkeys(f.suite for f in files_of(suites)):
        if suite in defaults:
            if not any((root / f).is_file() for f in defaults[suite]):
                out.append(f"suite {suite} still has no data file in {root} (a run reads one "
                           f"of {', '.join(defaults[suite])})")
            continue
        lacking = [f.path for f in files_of([suite])
                   if f.role == "required" and not (root / f.path).is_file()]
        if lacking:
            out.append(f"suite {suite} still lacks {', '.join(lacking)} in {root}")
    return out


def fetch_data(suites: list[str] | None = None, directory: str | None = None,
               mirror: str | None = None, force: bool = False, everything: bool = False,
               out: Any = None) -> int:
    """Make every suite of ``suites`` runnable from the data directory: fetch its required
    files, the first fetchable of its alternatives when none is present (with the companions
    of what is there) and, with ``everything``, every file of the table. A present file that
    fails its pin is replaced only with ``force``. Every step is printed; exit status 2 if
    a file could not be fetched or a suite is still not runnable."""
    out = out or sys.stdout
    root, origin = data_dir_origin(directory)
    print(f"data dir: {root} ({origin})", file=out)
    root.mkdir(parents=True, exist_ok=True)
    sums = read_sums(root)
    failed: list[str] = []

    def present(entry: DataFile) -> bool:
        path = root / entry.path
        if not path.is_file():
            return False
        expected = entry.sha256 or sums.get(entry.path)
        if expected is None or sha256_file(path) == expected:
            return True
        if not force:
            failed.append(f"{entry.path}: present but its SHA-256 differs from "
                          f"{expected[:12]}...; pass --force to replace it")
            return True
        return False

    def get(entry: DataFile) -> bool:
        """Fetch ``entry``; False (with a note) where it is not to be had."""
        if entry.source is None and not mirror:
            print(f"  {entry.path}: skipped (not published at a plain URL; use --mirror or "
                  f"copy it by hand)", file=out)
            return False
        try:
            how = fetch_file(entry, root, mirror)
        except NotPublished:
            if not mirror:
                raise
            print(f"  {entry.path}: not on the mirror (HTTP 404)", file=out)
            return False
        except UserError as exc:
            failed.append(str(exc))
            return False
        conversion = CONVERSIONS[None if mirror or entry.source is None
                                 else entry.source.convert]
        print(f"  {entry.path}: {how} ({conversion})", file=out)
        return True

    for suite in dict.fromkeys(f.suite for f in files_of(suites)):
        files = files_of([suite])
        have = next((f.path for f in files if f.role == "alternative"
                     and (root / f.path).is_file()), None)
        for entry in files:
            if present(entry):
                print(f"  {entry.path}: present", file=out)
            elif everything or entry.role == "required":
                get(entry)
            elif entry.role == "alternative":
                if have is None:
                    have = entry.path if get(entry) else None
                else:
                    print(f"  {entry.path}: not needed (a run reads {have})", file=out)
            elif entry.role == "companion":
                if (root / str(entry.serves)).is_file():
                    get(entry)
                else:
                    print(f"  {entry.path}: not needed (serves {entry.serves})", file=out)
            else:
                print(f"  {entry.path}: not needed (an extra: keh data fetch --all)", file=out)
    failed += unreadable(suites, root)
    for line in failed:
        print(f"keh: error: {line}", file=sys.stderr)
    return 2 if failed else 0
