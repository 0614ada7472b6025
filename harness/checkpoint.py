"""Checkpoints that make a run resumable after a kill at any moment (``keh run --resume``).

Layout, inside the run directory::

    checkpoint/progress.json            what is done (atomic JSON, written last)
    checkpoint/tensors-<serial>.safetensors
        weight.<layer>   edited rewrite matrices (sequential mode)
        weight.<module>  edited linear modules named by ``edit_modules`` (sequential mode)
        state.<key>      the method's solver state (sequential mode)
        rng.torch        torch's CPU generator state (uint8); rng.cuda.<i> on CUDA

``progress.json`` names the tensor file it belongs to; a new tensor file is written (temp file,
fsync, rename) *before* the progress that points to it, and older tensor files are deleted only
after, so a kill between the two leaves the previous, consistent pair. No pickle anywhere:
tensors go through safetensors, everything else through JSON.

``records_lines`` / ``curve_lines`` count the lines of ``records.jsonl`` / ``curve.jsonl`` that
belong to completed work; a resume cuts both files back to those counts (lines written by a
batch that was not marked complete are dropped, so a batch's records are all-or-nothing).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness import records as rec_io
from harness.cachefiles import atomic_write_with
from harness.errors import UserError

CHECKPOINT_DIR = "checkpoint"
PROGRESS = "progress.json"
FORMAT = 1
TENSOR_NAME = re.compile(r"tensors-[0-9]{6}\.safetensors")


@dataclass
class Progress:
    """What a run has finished. ``batches_done``: edited batches whose effects are saved
    (batch mode: evaluated and recorded too). ``final_evaluated``: sequential mode, cases of
    the final evaluation written (None before that phase starts). ``pending``: sequential mode,
    per-case entries ``{index, batch, diagnostics}`` or ``{index, batch, error}`` awaiting the
    final evaluation. ``rng``: Python and NumPy generator states (torch's is in the tensors).
    ``records_sha256`` / ``curve_sha256``: SHA-256 of the first ``records_lines`` /
    ``curve_lines`` lines of records.jsonl / curve.jsonl, checked before a resume trusts them
    (None in checkpoints written before they existed)."""

    batches_done: int = 0
    final_evaluated: int | None = None
    records_lines: int = 0
    curve_lines: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    tensors: str | None = None
    serial: int = 0
    format: int = FORMAT
    records_sha256: str | None = None
    curve_sha256: str | None = None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) as safetensors."""
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_with(path, lambda tmp: save_file(cpu, tmp))


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy states, torch generator states as uint8 tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`rng_state`."""
    if "python" in js:
        version, internal, gauss = js["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in js:
        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda])


def check_state(state: dict[str, Any], method: str) -> None:
    """Solver state must be a flat dict of tensors (it is checkpointed as safetensors)."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"method {method!r} returned solver state {key!r} of type "
                f"{type(value).__name__}; state values must be tensors keyed by strings so that "
                f"sequential runs can be checkpointed")


def save(run_dir: Path, progress: Progress, tensors: dict[str, torch.Tensor] | None) -> None:
    """Record ``progress``; with ``tensors``, first write them to a new tensor file (the
    progress then points to it). Without, the progress keeps its current tensor file."""
    d = checkpoint_dir(run_dir)
    d.mkdir(exist_ok=True)
    progress.records_sha256 = lines_sha256(Path(run_dir) / rec_io.RECORDS,
                                           progress.records_lines)
    progress.curve_sha256 = lines_sha256(Path(run_dir) / rec_io.CURVE, progress.curve_lines)
    if tensors is not None:
        progress.serial += 1
        name = f"tensors-{progress.serial:06d}.safetensors"
        save_tensors(d / name, tensors)
        progress.tensors = name
    rec_io.write_json(d / PROGRESS, asdict(progress))
    _remove_stale(d, progress.tensors)


#: a temporary file of :func:`harness.cachefiles.atomic_write_with`: ``.<target>.<random>.tmp``
_TEMP = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp")


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files that a process killed during an atomic write left in the run
    directory (``.manifest.json.*.tmp``, ``.records.jsonl.*.tmp``, ``.curve.jsonl.*.tmp``)
    and in its ``checkpoint/`` (``.progress.json.*.tmp``, ``.tensors-NNNNNN.safetensors.*.tmp``,
    each the size of the edited matrices). Only those names, only inside ``run_dir`` (a
    ``checkpoint`` that is a link is left alone); call it holding the run's lock. Returns what
    was deleted."""
    run_dir = Path(run_dir)
    cdir = checkpoint_dir(run_dir)
    ours = [(run_dir, lambda t: t in (rec_io.MANIFEST, rec_io.RECORDS, rec_io.CURVE))]
    if cdir.is_dir() and not cdir.is_symlink():
        ours.append((cdir, lambda t: t == PROGRESS or bool(TENSOR_NAME.fullmatch(t))))
    removed = []
    for d, is_ours in ours:
        for f in d.iterdir():
            m = _TEMP.fullmatch(f.name)
            if m and is_ours(m["target"]) and not f.is_dir():
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def _remove_stale(d: Path, keep: str | None) -> None:
    for f in d.glob("tensors-*.safetensors*"):
        if f.name != keep:
            f.unlink(missing_ok=True)


def load(run_dir: Path) -> tuple[Progress, dict[str, torch.Tensor]] | None:
    """The last saved progress and its tensors, or None if the run saved none yet."""
    d = checkpoint_dir(run_dir)
    path = d / PROGRESS
    if not path.exists():
        return None
    inside(run_dir, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        progress = Progress(**data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise UserError(f"{path}: not a valid checkpoint ({exc}); the run cannot be "
                        f"resumed, start it again in a new directory") from exc
    if progress.format != FORMAT:
        raise UserError(f"{path}: checkpoint format {progress.format}, this code reads "
                        f"{FORMAT}")
    tensors: dict[str, torch.Tensor] = {}
    if progress.tensors is not None:
        if not isinstance(progress.tensors, str) or not TENSOR_NAME.fullmatch(progress.tensors):
            raise UserError(f"{path}: tensor file {progress.tensors!r} is not a checkpoint "
                            f"file name (tensors-NNNNNN.safetensors); the run directory was "
                            f"modified and cannot be resumed")
        tpath = d / progress.tensors
        inside(run_dir, tpath)
        try:
            tensors = load_file(str(tpath))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{tpath}: cannot read the checkpoint's tensors ({exc})") from exc
    _remove_stale(d, progress.tensors)
    return progress, tensors


def inside(run_dir: Path, path: Path) -> Path:
    """``path`` resolved, refused (one line) unless it lies inside ``run_dir``: a run directory
    is only ever read inside itself (no symlink or ``..`` out of it)."""
    root = Path(run_dir).resolve()
    resolved = Path(path).resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise UserError(f"{path} points outside the run directory {run_dir} (to {resolved}); "
                        f"the run directory was modified and cannot be resumed")
    return resolved


def _prefix_end(raw: bytes, n_lines: int) -> int | None:
    """Byte offset after the first ``n_lines`` lines of ``raw``, None if it has fewer."""
    end = 0
    for _ in range(n_lines):
        nl = raw.find(b"\n", end)
        if nl < 0:
            return None
        end = nl + 1
    return end


def lines_sha256(path: Path, n_lines: int) -> str | None:
    """SHA-256 of the first ``n_lines`` lines of ``path`` (None if it has fewer)."""
    raw = path.read_bytes() if path.exists() else b""
    end = _prefix_end(raw, n_lines)
    return None if end is None else hashlib.sha256(raw[:end]).hexdigest()


def truncate_lines(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` complete lines of ``path`` (atomic rewrite if it had more,
    including a partial last line); refuse if it has fewer."""
    raw = path.read_bytes() if path.exists() else b""
    end = _prefix_end(raw, n_lines)
    if end is None:
        raise UserError(f"{path} holds fewer lines than its checkpoint says ({n_lines}); "
                        f"the run directory was modified and cannot be resumed")
    if end != len(raw):
        rec_io.atomic_write_text(path, raw[:end].decode("utf-8"))
