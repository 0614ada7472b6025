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
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import UserError
from harness.models import LoadedModel, cache_dir, load_model, sha256_file
from methods import get_method
from methods.base import EditRequest, load_hparams
from suites import downstream, get_suite
from suites.data import data_dir, find_data_file

CURVE = "curve.jsonl"
#: size of the fixed probe set of earlier edits re-evaluated at each sequential checkpoint
PROBE_SIZE = 20


@dataclass
class Prepared:
    """Everything validated before a model is loaded."""

    cfg: RunConfig
    method: Any
    suite: Any
    data_path: Path
    requests: list[EditRequest]
    hparams: Any
    hparams_source: str
    run_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


def prepare(cfg: RunConfig) -> Prepared:
    """Validate config, method, suite, data and hparams; nothing heavy, nothing written."""
    t0 = time.perf_counter()
    cfg.validate()
    method = get_method(cfg.method)
    suite = get_suite(cfg.suite)
    path = find_data_file(cfg.suite, suite.DEFAULT_FILES, suite.CANONICAL_URL,
                          directory=cfg.data_dir, explicit=cfg.data)
    all_requests = suite.load(path)
    if cfg.start + cfg.n_edits > len(all_requests):
        raise UserError(
            f"--n-edits {cfg.n_edits} (from --start {cfg.start}) exceeds the "
            f"{len(all_requests)} records in {path}"
        )
    requests = all_requests[cfg.start:cfg.start + cfg.n_edits]
    if cfg.generation_tokens and not _accepts(suite.evaluate, "generation_tokens"):
        raise UserError(f"--generation-tokens: suite {cfg.suite!r} has no generation metrics")
    if cfg.downstream:
        downstream.check_tasks(cfg.downstream, data_dir(cfg.data_dir), cfg.downstream_fewshot)
    hparams, source = load_hparams(method.Hparams, cfg.method, cfg.model, cfg.hparams,
                                   cfg.hparams_overrides)
    run_dir = Path(cfg.out_dir) / (cfg.run_id or cfg.default_run_id())
    return Prepared(cfg, method, suite, path, requests, hparams, source, run_dir,
                    {"prepare_s": time.perf_counter() - t0})


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    return name in inspect.signature(fn).parameters


def wants_curve(cfg: RunConfig) -> bool:
    """Whether the run writes checkpoints to ``curve.jsonl``."""
    return bool(cfg.downstream) or (cfg.sequential and cfg.eval_every > 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def edited_layers(hparams: Any) -> list[int]:
    """Layers whose rewrite matrix a method may change (hparams field ``layers``)."""
    return list(getattr(hparams, "layers", []) or [])


def _snapshot(lm: LoadedModel, layers: list[int]) -> dict[int, torch.Tensor]:
    return {layer: lm.rewrite_weight(layer).detach().clone() for layer in layers}


def _restore(lm: LoadedModel, snap: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, w in snap.items():
            lm.rewrite_weight(layer).copy_(w)


def _batches(items: list[EditRequest], size: int) -> list[list[EditRequest]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _case_record(cfg: RunConfig, index: int, batch: int, metrics: dict[str, Any],
                 diag: dict[str, Any]) -> dict[str, Any]:
    return {"method": cfg.method, "suite": cfg.suite, "model": cfg.model, "seed": cfg.seed,
            "case_index": cfg.start + index, "batch": batch, **metrics, "diagnostics": diag}


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


def run(cfg: RunConfig, log: Callable[[str], None] = print,
        lm: LoadedModel | None = None) -> Path:
    """Run ``cfg`` end to end; return the run directory. ``lm`` reuses a loaded model (its
    weights must be unedited; they are restored before this returns)."""
    p = prepare(cfg)
    if (p.run_dir / rec_io.MANIFEST).exists():
        raise UserError(f"run directory {p.run_dir} already holds a run; choose another "
                        f"--run-id or --out, resume it with --resume {p.run_dir}, or remove it")
    p.run_dir.mkdir(parents=True, exist_ok=True)
    timings = dict(p.timings)
    lm = _seed_and_load(cfg, lm, timings)
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


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of the run in ``run_dir``, validated enough to resume it (clear errors)."""
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run directory")
    path = run_dir / rec_io.MANIFEST
    if not path.exists():
        raise UserError(f"--resume {run_dir}: no {rec_io.MANIFEST} there (not a run directory, "
                        f"or the run was killed before it started: start it again)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--resume {run_dir}: {rec_io.MANIFEST} is not valid JSON "
                        f"({exc})") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"--resume {run_dir}: {rec_io.MANIFEST} is not a JSON object")
    missing = [k for k in ("config", "config_hash", "hparams", "data", "model", "git")
               if not isinstance(manifest.get(k), dict | str)]
    if missing:
        raise UserError(f"--resume {run_dir}: {rec_io.MANIFEST} lacks {', '.join(missing)}")
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
    old_hp = manifest["hparams"]
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


def resume(run_dir: str | Path, log: Callable[[str], None] = print,
           lm: LoadedModel | None = None, allow_revision_change: bool = False,
           stop_on_error: bool | None = None) -> Path:
    """Continue the killed run in ``run_dir`` from its last checkpoint; the records end up
    identical to those of an uninterrupted run. The config comes from the run's manifest (its
    location fields from ``run_dir``); ``stop_on_error`` (None: as the run was started)
    applies from now on. Refused, naming the difference, if the config, hparams, data file,
    model weights or code revision (unless ``allow_revision_change``) differ."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    try:
        cfg = RunConfig.from_dict(dict(manifest["config"]))
    except (TypeError, UserError) as exc:
        raise UserError(f"--resume {run_dir}: the manifest's config does not fit this code "
                        f"({exc})") from exc
    cfg.out_dir, cfg.run_id = str(run_dir.parent), run_dir.name
    if stop_on_error is not None:
        cfg.stop_on_error = stop_on_error
    p = prepare(cfg)
    diffs, git = differences(p, manifest, allow_revision_change)
    if diffs:
        raise UserError(f"cannot resume {run_dir}: " + "; ".join(diffs) + " differ(s) from "
                        "the run's manifest")
    saved = ckpt.load(run_dir)  # validated before the model is loaded
    timings = dict(p.timings)
    lm = _seed_and_load(cfg, lm, timings)
    if lm.sha256 != manifest["model"].get("sha256"):
        raise UserError(f"cannot resume {run_dir}: model {cfg.model} (sha256 {lm.sha256}) "
                        f"differs from the run's manifest ({manifest['model'].get('sha256')})")
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


class RunError(UserError):
    """The run stopped on an editing error (``--stop-on-error``)."""


def _execute(p: Prepared, lm: LoadedModel, manifest: dict[str, Any], timings: dict[str, Any],
             saved: tuple[ckpt.Progress, dict[str, torch.Tensor]] | None,
             log: Callable[[str], None]) -> Path:
    """The edit/evaluate loop of a new or resumed run, then the final manifest."""
    cfg = p.cfg
    nondeterministic: set[str] = set(manifest.get("nondeterministic_ops") or [])
    original = _snapshot(lm, edited_layers(p.hparams))
    try:
        with capture_nondeterminism(nondeterministic):
            loop_timings = _edit_and_evaluate(p, lm, original, saved, log)
    except RunError as exc:
        manifest.update({"status": "error", "error": str(exc),
                         "nondeterministic_ops": sorted(nondeterministic)})
        rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
        raise
    finally:
        _restore(lm, original)  # the caller's model leaves unedited, whatever happened

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
    ok = [r for r in all_records if not r.get("failed")]
    summary = p.suite.summarize(ok) if ok else {}
    summary["n_failed"] = len(all_records) - len(ok)
    if wants_curve(cfg):
        manifest["curve"] = CURVE
    manifest.update({"status": "complete", "timings": timings,
                     "peak_memory": rec_io.peak_memory(lm.device), "summary": summary,
                     "nondeterministic_ops": sorted(nondeterministic),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
    log(format_summary(p.run_dir, cfg, summary, timings))
    return p.run_dir


#: the start of torch's warning for an op without a deterministic implementation (warn_only)
NONDETERMINISTIC = "does not have a deterministic implementation"


@contextlib.contextmanager
def capture_nondeterminism(found: set[str]) -> Iterator[None]:
    """Collect into ``found`` (deduplicated) the ops torch warns are non-deterministic; other
    warnings pass through to the usual filters and handlers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=f".*{NONDETERMINISTIC}")
        previous = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            text = str(message)
            if NONDETERMINISTIC in text:
                found.add(text.split(", but you set")[0].strip())
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _evaluate_kwargs(p: Prepared, reference: list[dict[str, Any]] | None,
                     indices: list[int], generation: bool) -> dict[str, Any]:
    """Keyword arguments of ``suite.evaluate`` for the cases ``indices``."""
    kwargs: dict[str, Any] = {"batch_size": p.cfg.eval_batch_size}
    if reference is not None:
        kwargs["reference"] = [reference[i] for i in indices]
    if generation and p.cfg.generation_tokens > 0:
        kwargs["generation_tokens"] = p.cfg.generation_tokens
    return kwargs


def _checkpoint(p: Prepared, lm: LoadedModel, reference: list[dict[str, Any]] | None,
                n_edits: int, batches_done: int, edits_in_model: int,
                timings: dict[str, float]) -> dict[str, Any]:
    """One curve line: downstream scores and (sequential mode) the probe-set summary."""
    cfg = p.cfg
    line: dict[str, Any] = {"n_edits_so_far": n_edits, "batch": batches_done,
                            "edits_in_model": edits_in_model}
    if cfg.downstream:
        t0 = time.perf_counter()
        kwargs = {"limit": cfg.downstream_limit or None, "num_fewshot": cfg.downstream_fewshot,
                  "batch_size": cfg.eval_batch_size}
        if edits_in_model == 0:  # the unedited model: measured once per model and settings
            scores, cached = downstream.evaluate_unedited(
                lm, cfg.downstream, data_dir(cfg.data_dir), cache_dir() / "downstream",
                **kwargs)
            line["downstream_cache"] = str(cached) if cached else None
        else:
            scores = downstream.evaluate_downstream(lm, cfg.downstream, data_dir(cfg.data_dir),
                                                    **kwargs)
        dt = time.perf_counter() - t0
        timings["downstream_s"] += dt
        timings["downstream_examples"] += sum(v["n"] for v in scores.values())
        line.update({"downstream": scores, "downstream_s": dt})
    if cfg.sequential:
        probe = list(range(min(PROBE_SIZE, len(p.requests))))
        t0 = time.perf_counter()
        metrics = p.suite.evaluate(lm, [p.requests[i] for i in probe],
                                   **_evaluate_kwargs(p, reference, probe, generation=False))
        timings["probe_s"] += time.perf_counter() - t0
        line.update({"probe": p.suite.summarize(metrics), "probe_size": len(probe),
                     "probe_edited": min(n_edits, len(probe))})
    return line


def _finite(value: Any) -> bool:
    """Whether every number in a (nested) diagnostic value is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _edit_batch(p: Prepared, lm: LoadedModel, batch: list[EditRequest],
                state: dict[str, Any]) -> tuple[Any, str | None]:
    """(outcome, None) or (None, error message) when the method raised a numerical error
    (:class:`methods.solvers.NumericalError` or another ``ValueError``, a
    ``torch.linalg.LinAlgError``) or returned non-finite diagnostics."""
    try:
        outcome = p.method.edit(lm, batch, p.hparams, state)
    except (ValueError, torch.linalg.LinAlgError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    bad = sorted({k for d in outcome.diagnostics for k, v in d.items() if not _finite(v)})
    if bad:
        return None, f"non-finite diagnostics: {', '.join(bad)}"
    return outcome, None


def _edit_and_evaluate(p: Prepared, lm: LoadedModel, original: dict[int, torch.Tensor],
                       saved: tuple[ckpt.Progress, dict[str, torch.Tensor]] | None,
                       log: Callable[[str], None] = print) -> dict[str, float]:
    """The loop proper, from the checkpoint ``saved`` if given; records go to records.jsonl.
    Returns timings: edit_s, evaluate_s, reference_s, downstream_s, downstream_examples,
    probe_s and the method's own edit_<phase>."""
    cfg = p.cfg
    records_path, curve_path = p.run_dir / rec_io.RECORDS, p.run_dir / CURVE
    layers = edited_layers(p.hparams)
    timings: dict[str, float] = {"edit_s": 0.0, "evaluate_s": 0.0, "reference_s": 0.0,
                                 "downstream_s": 0.0, "downstream_examples": 0, "probe_s": 0.0}
    lm.info["seed"] = cfg.seed  # methods draw their context prefixes from the run's seed
    hook = getattr(p.method, "prepare", None)
    if hook is not None:  # caches computed on the unedited model (stats, context prefixes)
        t0 = time.perf_counter()
        hook(lm, p.hparams)
        timings["edit_prepare_s"] = time.perf_counter() - t0
        timings["edit_s"] += timings["edit_prepare_s"]
    reference = None
    if hasattr(p.suite, "reference"):  # the unedited model's own outputs, before any edit
        t0 = time.perf_counter()
        reference = p.suite.reference(lm, p.requests, batch_size=cfg.eval_batch_size)
        timings["reference_s"] = time.perf_counter() - t0

    prog = ckpt.Progress()
    state: dict[str, Any] = {}
    if saved is not None:  # back to the last checkpoint: files, weights, state, generators
        prog, tensors = saved
        for k, v in prog.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        ckpt.truncate_lines(records_path, prog.records_lines)
        ckpt.truncate_lines(curve_path, prog.curve_lines)
        with torch.no_grad():
            for layer in layers:
                if f"weight.{layer}" in tensors:
                    lm.rewrite_weight(layer).copy_(tensors[f"weight.{layer}"])
        state = {k[len("state."):]: v.to(lm.device) for k, v in tensors.items()
                 if k.startswith("state.")}
        ckpt.set_rng_state(prog.rng, tensors)
    else:
        ckpt.truncate_lines(records_path, 0)
        ckpt.truncate_lines(curve_path, 0)

    def save(with_tensors: bool) -> None:
        prog.timings = {k: v for k, v in timings.items()}
        if not with_tensors:
            ckpt.save(p.run_dir, prog, None)
            return
        prog.rng, tensors = ckpt.rng_state()
        if cfg.sequential:
            tensors.update({f"weight.{layer}": lm.rewrite_weight(layer) for layer in layers})
            tensors.update({f"state.{k}": v for k, v in state.items()})
        ckpt.save(p.run_dir, prog, tensors)

    def evaluate(part: list[dict[str, Any]]) -> None:
        """Evaluate the cases of ``part`` that did not fail; append all their records."""
        ok = [e for e in part if "error" not in e]
        metrics: list[dict[str, Any]] = []
        if ok:
            t0 = time.perf_counter()
            indices = [e["index"] for e in ok]
            metrics = p.suite.evaluate(lm, [p.requests[i] for i in indices],
                                       **_evaluate_kwargs(p, reference, indices,
                                                          generation=True))
            timings["evaluate_s"] += time.perf_counter() - t0
        it = iter(metrics)
        recs = [_failed_record(p, e) if "error" in e
                else _case_record(cfg, e["index"], e["batch"], next(it), e["diagnostics"])
                for e in part]
        rec_io.append_records(records_path, recs)
        prog.records_lines += len(recs)

    curve = wants_curve(cfg)

    def checkpoint(n_edits: int, batches_done: int, edits_in_model: int) -> None:
        line = _checkpoint(p, lm, reference, n_edits, batches_done, edits_in_model, timings)
        rec_io.append_records(curve_path, [line])
        prog.curve_lines += 1
        log(format_checkpoint(line))

    batches = _batches(p.requests, cfg.batch_size)
    if curve and prog.batches_done == 0 and prog.curve_lines == 0:
        checkpoint(0, 0, 0)
        save(with_tensors=True)
    todo = range(prog.batches_done, len(batches)) if prog.final_evaluated is None else range(0)
    for b in tqdm(todo, desc=f"{cfg.method} edit", unit="batch"):
        batch, first = batches[b], b * cfg.batch_size
        before = _snapshot(lm, layers) if cfg.sequential else original
        t0 = time.perf_counter()
        outcome, error = _edit_batch(p, lm, batch, state)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        timings["edit_s"] += time.perf_counter() - t0
        if error is None:
            for phase, secs in outcome.timings.items():  # the method's own split of edit_s
                timings[f"edit_{phase}"] = timings.get(f"edit_{phase}", 0.0) + secs
            if cfg.sequential:  # batch mode: every batch from scratch
                ckpt.check_state(outcome.state, cfg.method)
                state = outcome.state
            entries = [{"index": first + j, "batch": b,
                        "diagnostics": json.loads(rec_io.dumps_record(d))}
                       for j, d in enumerate(outcome.diagnostics)]
        else:
            where = f"batch {b} (cases {cfg.start + first}..{cfg.start + first + len(batch) - 1})"
            if cfg.stop_on_error:
                raise RunError(f"{cfg.method} failed on {where}: {error} (stopped by "
                               f"--stop-on-error; without it the cases are recorded as failed)")
            log(f"{cfg.method} failed on {where}: {error}; cases recorded as failed, "
                f"weights restored to before the batch")
            _restore(lm, before)
            entries = [{"index": first + j, "batch": b, "error": error}
                       for j in range(len(batch))]
        if not cfg.sequential:
            evaluate(entries)
            if curve and b == len(batches) - 1:
                checkpoint(first + len(batch), b + 1, len(batch) if error is None else 0)
            _restore(lm, original)
        else:
            prog.pending += entries
            if cfg.eval_every > 0 and (b + 1) % cfg.eval_every == 0:
                checkpoint(first + len(batch), b + 1, first + len(batch))
        prog.batches_done = b + 1
        save(with_tensors=True)
    if cfg.sequential:
        n = len(p.requests)
        if prog.final_evaluated is None:
            at_end = cfg.eval_every > 0 and len(batches) % cfg.eval_every == 0
            if curve and not at_end:
                checkpoint(n, len(batches), n)
            prog.final_evaluated = 0
            save(with_tensors=False)
        chunk = max(cfg.batch_size, 50)
        for start in tqdm(range(prog.final_evaluated, n, chunk), desc="evaluate",
                          unit="chunk"):
            part = prog.pending[start:start + chunk]
            evaluate(part)
            prog.final_evaluated = start + len(part)
            save(with_tensors=False)
    return timings


def _failed_record(p: Prepared, entry: dict[str, Any]) -> dict[str, Any]:
    """The record of a case whose batch failed: no metrics, the error."""
    cfg = p.cfg
    return {"method": cfg.method, "suite": cfg.suite, "model": cfg.model, "seed": cfg.seed,
            "case_index": cfg.start + entry["index"], "batch": entry["batch"],
            "case_id": p.requests[entry["index"]].case_id, "failed": True,
            "error": entry["error"], "diagnostics": {}}


def format_checkpoint(line: dict[str, Any]) -> str:
    parts = [f"checkpoint after {line['n_edits_so_far']} edits ({line['batch']} batches):"]
    for task, v in (line.get("downstream") or {}).items():
        acc = v.get("acc")
        parts.append(f"{task}={100 * acc:.1f}%" if acc is not None else f"{task}=n/a")
    if line.get("probe"):
        parts.append("probe " + " ".join(f"{k}={v:.2f}" for k, v in line["probe"].items()))
    return " ".join(parts)


def format_summary(run_dir: Path, cfg: RunConfig, summary: dict[str, float],
                   timings: dict[str, Any]) -> str:
    parts = [f"{k}={v}" if isinstance(v, int) else f"{k}={v:.2f}" for k, v in summary.items()]
    tpe = timings.get("time_per_edit_s")
    cps = timings.get("eval_cases_per_s")
    return (f"{cfg.method} on {cfg.suite} ({cfg.model}, {cfg.n_edits} cases): "
            + " ".join(parts)
            + (f" | time/edit {tpe:.3f}s" if tpe is not None else "")
            + (f" ({timings['time_per_edit_excl_prepare_s']:.3f}s without one-off statistics)"
               if timings.get("edit_prepare_s") else "")
            + (f" | eval {cps:.1f} cases/s" if cps else "")
            + f"\nrecords: {run_dir}")
