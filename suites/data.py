"""Finding and reading data files, with errors that say which file, where, and how to get it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import DataError, UserError
from harness.paths import data_dir

__all__ = ["data_dir", "find_data_file"]


def find_data_file(suite: str, candidates: list[str], canonical_url: str,
                   directory: str | Path | None = None, explicit: str | Path | None = None) -> Path:
    """``explicit`` if given (a path, or one relative to the data dir; must exist), else the first
    of ``candidates`` under the data dir."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file() and not p.is_absolute() and (data_dir(directory) / p).is_file():
            p = data_dir(directory) / p
        if not p.is_file():
            raise UserError(f"data file {p} for suite {suite!r} does not exist (neither as a "
                            f"path nor under the data dir {data_dir(directory)})")
        return p
    root = data_dir(directory)
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    looked = ", ".join(str(root / c) for c in candidates)
    raise UserError(
        f"no data file for suite {suite!r}: looked for {looked} (data dir from --data-dir, "
        f"$KEH_DATA_DIR, ../shared/data beside the checkout, else ./data). Run `keh data fetch "
        f"{suite}` (canonical file: {canonical_url}), or pass --data PATH"
    )


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON lines; clear errors for empty/truncated/wrong files."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(path, "file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.suffix == ".jsonl":
            data = []
            for n, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e2:
                    raise DataError(path, f"line {n + 1} is not valid JSON ({e2.msg})") from e2
        else:
            raise DataError(path, f"not valid JSON (truncated or corrupt?): {exc.msg} at line "
                                  f"{exc.lineno} column {exc.colno}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(path, f"expected a list of records, got {type(data).__name__}")
    if not data:
        raise DataError(path, "holds no records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(path, f"expected an object, got {type(rec).__name__}", index=i)
    return data


def require_str(path: Path, rec: dict[str, Any], i: int, key: str, allow_empty: bool = False,
                aliases: tuple[str, ...] = ()) -> str:
    """``rec[key]`` as a non-empty string, or a DataError naming file, record and field."""
    for k in (key, *aliases):
        if k in rec:
            val = rec[k]
            if isinstance(val, dict) and "str" in val:  # canonical CounterFact {"str": ...}
                val = val["str"]
            if not isinstance(val, str):
                raise DataError(path, f"expected a string, got {type(val).__name__}", i, k)
            if not allow_empty and not val.strip():
                raise DataError(path, "is empty", i, k)
            return val
    raise DataError(path, "missing", i, key)


def require_str_list(path: Path, rec: dict[str, Any], i: int, key: str) -> tuple[str, ...]:
    val = rec.get(key)
    if val is None:
        raise DataError(path, "missing", i, key)
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list) or not all(isinstance(v, str) and v.strip() for v in val):
        raise DataError(path, "expected a list of non-empty strings", i, key)
    return tuple(val)
