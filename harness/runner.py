"""The edit/evaluate loop: one public entry point, :func:`run`, taking a :class:`RunConfig`.

Modes
* batch (``sequential=False``): for each batch, edit, evaluate that batch's cases, restore the
  edited weights; every batch starts from the unedited model.
* sequential: edits accumulate (the method's solver state is carried between batches); every
  case is evaluated once after the last batch (the protocol of MEMIT/AlphaEdit tables).

Before any edit, a suite that defines ``reference(lm, requests, batch_size)`` (zsRE: the unedited
model's own predictions) gets one pass over all requests of the run on the unedited model; each
``evaluate`` call then receives the matching slice as ``reference=``.

Checkpoints (``curve.jsonl``, one line each, written when ``downstream`` tasks are given or, in
sequential mode, ``eval_every > 0``): before the first edit, every ``eval_every`` batches
(sequential mode only) and after the last batch (batch mode: on the last batch's edited model,
before the restore). Each line holds ``n_edits_so_far``, ``batch`` (batches done),
``edits_in_model``, the downstream scores (:func:`suites.downstream.evaluate_downstream`) and, in
sequential mode, the suite summary of a fixed probe set, the first ``min(PROBE_SIZE, n)`` cases of
the run (``probe_edited`` of them edited so far), to measure forgetting of earlier edits.

Reliability (:mod:`harness.checkpoint`): after every batch (and every chunk of the final
sequential evaluation) the run saves what it has done, so :func:`resume` continues a run killed
at any moment with records byte-identical to an uninterrupted run. A method that fails on a
batch (``NumericalError`` or another ``ValueError``, non-finite diagnostics) gets that batch's
cases recorded as ``failed`` (with ``error``, without metrics), the weights restored to before
the batch, and the run goes on (``stop_on_error``: stop instead). Summaries skip failed cases
and count them (``n_failed``). Ops that torch warns are non-deterministic are listed in the
manifest (``nondeterministic_ops``).

This module orchestrates; the pieces live in :mod:`harness.prepare` (validation before a model
loads), :mod:`harness.resume` (resume checks), :mod:`harness.loop` (the loop proper) and
:mod:`harness.formatting` (console lines).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.cachefiles import run_lock
from harness.config import RunConfig
from harness.errors import UserError, write_failure
from harness.formatting import format_checkpoint, format_summary
from harness.loop import (
    CURVE,
    PROBE_SIZE,
    RunError,
    _edit_and_evaluate,
    capture_nondeterminism,
    restore_weights,
    seed_everything,
    snapshot_weights,
)
from harness.models import LoadedModel, load_model, sha256_file
from harness.prepare import Prepared, check_model, prepare, wants_curve
from harness.resume import check_checkpoint, differences, read_manifest
from suites.itt import intention_to_treat

__all__ = ["CURVE", "PROBE_SIZE", "Prepared", "RunError", "differences", "format_checkpoint",
           "format_summary", "prepare", "read_manifest", "resume", "run", "wants_curve"]


def _seed_and_load(cfg: RunConfig, lm: LoadedModel | None,
                   timings: dict[str, Any]) -> LoadedModel:
    """Seed every RNG, then load the model unless one is given; time it into ``timings``."""
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    if lm is None:
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code)
    timings["load_model_s"] = time.perf_counter() - t0
    return lm


def _refuse_existing(run_dir: Path) -> None:
    if (run_dir / rec_io.MANIFEST).exists():
        raise UserError(f"run directory {run_dir} already holds a run; choose another "
                        f"--run-id or --out, resume it with --resume {run_dir}, or remove it")


@contextlib.contextmanager
def _resumable_writes(run_dir: Path) -> Iterator[None]:
    """A write that fails in the body (disk full, quota, file size limit, read-only file
    system, I/O error; an ``OSError`` or a library's error such as safetensors') ends in one
    :class:`UserError` naming the file and how to continue: the checkpoints are atomic, so the
    run resumes from its last complete one."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        message, filename = failure
        then = (f"continue from the last checkpoint with --resume {run_dir}"
                if (run_dir / rec_io.MANIFEST).exists() else "start the run again")
        raise UserError(f"writing the run failed: {message} ({filename or run_dir}); free "
                        f"space or make the disk writable, then {then}") from exc


def run(cfg: RunConfig, log: Callable[[str], None] = print,
        lm: LoadedModel | None = None) -> Path:
    """Run ``cfg`` end to end; return the run directory. ``lm`` reuses a loaded model (its
    weights must be unedited; they are restored before this returns). Everything is
    validated before the run directory is created; the run holds its directory's lock
    (:func:`harness.cachefiles.run_lock`) until it ends."""
    p = prepare(cfg)
    _refuse_existing(p.run_dir)
    timings = dict(p.timings)
    lm = _seed_and_load(cfg, lm, timings)
    check_model(p, lm)
    try:
        p.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {cfg.out_dir}: cannot create {p.run_dir} ({exc.strerror})") \
            from exc
    with run_lock(p.run_dir), _resumable_writes(p.run_dir):
        _refuse_existing(p.run_dir)  # a concurrent start of the same run may have won
        ckpt.remove_temp_files(p.run_dir)  # a start killed while writing its manifest
        manifest: dict[str, Any] = {
            "run_id": p.run_dir.name,
            "status": "running",
            "config": cfg.to_dict(),
            "config_hash": cfg.identity_hash(),
            "method": cfg.method,
            "hparams": dataclasses.asdict(p.hparams),
            "hparams_source": p.hparams_source,
            "seed": cfg.seed,
            "data": {"path": str(p.data_path), "sha256": sha256_file(p.data_path),
                     "n_cases": len(p.requests), "case_ids": [r.case_id for r in p.requests]},
            "model": {"name": cfg.model, "sha256": lm.sha256, "source": lm.source,
                      "n_layers": lm.n_layers, "dtype": str(lm.dtype),
                      **{k: v for k, v in lm.info.items() if not k.startswith("_")}},
            "versions": rec_io.package_versions(),
            "git": rec_io.git_revision(),
            "device": rec_io.device_description(lm.device),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed": [],
            "nondeterministic_ops": [],
        }
        rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
        return _execute(p, lm, manifest, timings, None, log)


def resume(run_dir: str | Path, log: Callable[[str], None] = print,
           lm: LoadedModel | None = None, allow_revision_change: bool = False,
           stop_on_error: bool | None = None) -> Path:
    """Continue the killed run in ``run_dir`` from its last checkpoint; the records end up
    identical to those of an uninterrupted run. The config comes from the run's manifest (its
    location fields from ``run_dir``); ``stop_on_error`` (None: as the run was started)
    applies from now on. Refused, naming the difference, if the config, hparams, data file,
    model weights or code revision (unless ``allow_revision_change``) differ, if another
    process holds the run, or if the checkpoint does not match records.jsonl."""
    run_dir = Path(run_dir)
    read_manifest(run_dir)  # a run directory, before a lock file is created in it
    with run_lock(run_dir), _resumable_writes(run_dir):
        return _resume_locked(run_dir, log, lm, allow_revision_change, stop_on_error)


def _resume_locked(run_dir: Path, log: Callable[[str], None], lm: LoadedModel | None,
                   allow_revision_change: bool, stop_on_error: bool | None) -> Path:
    manifest = read_manifest(run_dir)  # again: the process that held the lock may have ended it
    try:
        cfg = RunConfig.from_dict(dict(manifest["config"]))
    except (TypeError, UserError) as exc:
        raise UserError(f"--resume {run_dir}: the manifest's config does not fit this code "
                        f"({exc})") from exc
    real = run_dir.resolve()  # a link to a run directory resumes the directory itself
    cfg.out_dir, cfg.run_id = str(real.parent), real.name
    if stop_on_error is not None:
        cfg.stop_on_error = stop_on_error
    p = prepare(cfg)
    diffs, git = differences(p, manifest, allow_revision_change)
    if diffs:
        raise UserError(f"cannot resume {run_dir}: " + "; ".join(diffs) + " differ(s) from "
                        "the run's manifest")
    ckpt.remove_temp_files(run_dir)  # what a kill during an atomic write left behind
    saved = ckpt.load(run_dir)  # validated before the model is loaded
    check_checkpoint(p, saved)
    timings = dict(p.timings)
    lm = _seed_and_load(cfg, lm, timings)
    if lm.sha256 != manifest["model"].get("sha256"):
        raise UserError(f"cannot resume {run_dir}: model {cfg.model} (sha256 {lm.sha256}) "
                        f"differs from the run's manifest ({manifest['model'].get('sha256')})")
    check_model(p, lm)
    entry: dict[str, Any] = {"at_batch": saved[0].batches_done if saved else 0,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if git["commit"] != manifest["git"].get("commit"):
        entry["git"] = git
    manifest["resumed"] = [*manifest.get("resumed", []), entry]
    manifest["status"] = "running"
    manifest["config"] = cfg.to_dict()
    manifest.pop("error", None)
    rec_io.write_json(run_dir / rec_io.MANIFEST, manifest)
    log(f"resuming {run_dir} at batch {entry['at_batch']}")
    return _execute(p, lm, manifest, timings, saved, log)


def _execute(p: Prepared, lm: LoadedModel, manifest: dict[str, Any], timings: dict[str, Any],
             saved: tuple[ckpt.Progress, dict[str, torch.Tensor]] | None,
             log: Callable[[str], None]) -> Path:
    """The edit/evaluate loop of a new or resumed run, then the final manifest."""
    cfg = p.cfg
    nondeterministic: set[str] = set(manifest.get("nondeterministic_ops") or [])
    original = snapshot_weights(lm, p.hparams)
    try:
        with capture_nondeterminism(nondeterministic):
            loop_timings = _edit_and_evaluate(p, lm, original, saved, log)
    except RunError as exc:
        manifest.update({"status": "error", "error": str(exc),
                         "nondeterministic_ops": sorted(nondeterministic)})
        rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
        raise
    finally:
        # the caller's model leaves unedited, whatever happened
        restore_weights(lm, p.hparams, original)

    n = len(p.requests)
    edit_s, eval_s = loop_timings["edit_s"], loop_timings["evaluate_s"]
    timings.update(loop_timings)
    one_off = loop_timings.get("edit_prepare_s", 0.0)  # key statistics, context prefixes
    timings.update({"time_per_edit_s": edit_s / n,
                    "time_per_edit_excl_prepare_s": (edit_s - one_off) / n,
                    "edits_per_s": n / edit_s if edit_s > 0 else None,
                    "eval_cases_per_s": n / eval_s if eval_s > 0 else None})
    if loop_timings.get("downstream_s"):
        timings["downstream_examples_per_s"] = (loop_timings["downstream_examples"]
                                                / loop_timings["downstream_s"])
    all_records = rec_io.read_records(p.run_dir / rec_io.RECORDS)
    # intention to treat: failed edits are failures in the edit's rates and keep their
    # measured outcomes elsewhere (the report's rule, suites.itt.intention_to_treat)
    summary = p.suite.summarize(intention_to_treat(all_records)) if all_records else {}
    summary["n_failed"] = sum(bool(r.get("failed")) for r in all_records)
    if wants_curve(cfg):
        manifest["curve"] = CURVE
    manifest.update({"status": "complete", "timings": timings,
                     "peak_memory": rec_io.peak_memory(lm.device), "summary": summary,
                     "nondeterministic_ops": sorted(nondeterministic),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
    log(format_summary(p.run_dir, cfg, summary, timings))
    return p.run_dir


