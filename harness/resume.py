"""Checks before a killed run is resumed: its manifest, and what differs from it now."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.errors import UserError
from harness.models import sha256_file
from harness.prepare import Prepared
from methods.base import with_defaults

#: what a manifest must hold for a run to be compared or resumed
MANIFEST_KEYS = ("config", "config_hash", "hparams", "data", "model", "git")


def parse_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path`` as a dict holding :data:`MANIFEST_KEYS`; ValueError naming what
    is wrong (not valid JSON: cut short or edited, not an object, keys missing)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ValueError("is not a JSON object")
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest.get(k), dict | str)]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    return manifest


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of the run in ``run_dir``, validated enough to resume it (clear errors)."""
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run directory")
    path = run_dir / rec_io.MANIFEST
    if path.exists() or path.is_symlink():
        ckpt.inside(run_dir, path)
    if not path.exists():
        raise UserError(f"--resume {run_dir}: no {rec_io.MANIFEST} there (not a run directory, "
                        f"or the run was killed before it started: start it again)")
    try:
        manifest = parse_manifest(path)
    except ValueError as exc:
        raise UserError(f"--resume {run_dir}: {rec_io.MANIFEST} {exc}") from exc
    if manifest.get("status") == "complete":
        raise UserError(f"--resume {run_dir}: the run is already complete; nothing to resume")
    return manifest


def differences(p: Prepared, manifest: dict[str, Any], allow_revision_change: bool
                 ) -> tuple[list[str], dict[str, Any]]:
    """What differs between the run in ``manifest`` and what resuming it now would use
    (config, hparams, data file, code revision); also the current git revision."""
    diffs = []
    now_hash = p.cfg.identity_hash()
    if manifest["config_hash"] != now_hash:
        diffs.append(f"config (config_hash {manifest['config_hash']} in the manifest, "
                     f"{now_hash} now)")
    now_hp = json.loads(rec_io.dumps_record(dataclasses.asdict(p.hparams)))
    old_hp = with_defaults(type(p.hparams), manifest["hparams"])  # fields added since: default
    changed = sorted(k for k in set(now_hp) | set(old_hp) if now_hp.get(k) != old_hp.get(k))
    if changed:
        diffs.append("hparams (" + ", ".join(
            f"{k}: {old_hp.get(k)!r} -> {now_hp.get(k)!r}" for k in changed) + ")")
    old_sha = manifest["data"].get("sha256")
    now_sha = sha256_file(p.data_path)
    if old_sha != now_sha:
        diffs.append(f"data file {p.data_path} (sha256 {str(old_sha)[:12]}... in the manifest, "
                     f"{now_sha[:12]}... now)")
    git = rec_io.git_revision()
    old_rev = manifest["git"].get("commit")
    if old_rev != git["commit"] and not allow_revision_change:
        diffs.append(f"code revision (git commit {old_rev} in the manifest, {git['commit']} "
                     f"now; --allow-revision-change overrides this check)")
    return diffs, git




def _count(progress: ckpt.Progress, name: str, lo: int, hi: int) -> int:
    value = getattr(progress, name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} = {value!r}, expected an integer in {lo}..{hi}")
    return value


def _expected_counts(p: Prepared, prog: ckpt.Progress) -> None:
    """The counts of ``prog`` agree with each other and with the run's cases (ValueError)."""
    n, bs = len(p.requests), p.cfg.batch_size
    n_batches = -(-n // bs)
    done = _count(prog, "batches_done", 0, n_batches)
    _count(prog, "curve_lines", 0, 10**9)
    _count(prog, "serial", 0, 10**12)
    edited = min(done * bs, n)
    if p.cfg.sequential:
        if prog.final_evaluated is not None:
            _count(prog, "final_evaluated", 0, n)
            if done != n_batches:
                raise ValueError(f"final_evaluated is set after {done} of {n_batches} batches")
        if not isinstance(prog.pending, list) or len(prog.pending) != edited:
            raise ValueError(f"{len(prog.pending) if isinstance(prog.pending, list) else '?'} "
                             f"pending cases after {done} batches of {bs}, expected {edited}")
        for i, entry in enumerate(prog.pending):
            if not isinstance(entry, dict) or entry.get("index") != i:
                raise ValueError(f"pending case {i} is not an entry for case {i}")
        _count(prog, "records_lines", prog.final_evaluated or 0, prog.final_evaluated or 0)
    else:
        if prog.final_evaluated is not None or prog.pending:
            raise ValueError("a batch-mode run has sequential progress")
        _count(prog, "records_lines", edited, edited)


def check_checkpoint(p: Prepared, saved: tuple[ckpt.Progress, Any] | None) -> None:
    """Before a resume trusts a checkpoint: its counts fit the run (cases, batch size, mode),
    records.jsonl and curve.jsonl hold the lines it counts, unchanged (SHA-256 of those lines
    as saved, where the checkpoint has one), and each of those lines is a JSON object."""
    run_dir = p.run_dir
    prog = saved[0] if saved is not None else ckpt.Progress()
    where = run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS
    try:
        _expected_counts(p, prog)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}; the checkpoint does not fit the run and cannot be "
                        f"trusted (start the run again in a new directory)") from exc
    for name, n_lines, digest in ((rec_io.RECORDS, prog.records_lines, prog.records_sha256),
                                  (rec_io.CURVE, prog.curve_lines, prog.curve_sha256)):
        path = run_dir / name
        if path.exists() or path.is_symlink():
            ckpt.inside(run_dir, path)
        if digest is not None and ckpt.lines_sha256(path, n_lines) != digest:
            raise UserError(f"{path}: its first {n_lines} lines differ from what the last "
                            f"checkpoint saved (sha256); the file was modified and the run "
                            f"cannot be resumed (start it again in a new directory)")
        raw = path.read_bytes() if path.exists() else b""
        for i, line in enumerate(raw.split(b"\n")[:n_lines]):
            try:
                ok = isinstance(json.loads(line), dict)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                raise UserError(f"{path}, line {i + 1}: not a complete JSON record (truncated "
                                f"or edited); the run cannot be resumed from it (start it "
                                f"again in a new directory)")
