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
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import UserError
from harness.models import LoadedModel, load_model, sha256_file
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


def run(cfg: RunConfig, log: Callable[[str], None] = print,
        lm: LoadedModel | None = None) -> Path:
    """Run ``cfg`` end to end; return the run directory. ``lm`` reuses a loaded model (its
    weights must be unedited; they are restored before this returns)."""
    p = prepare(cfg)
    if (p.run_dir / rec_io.MANIFEST).exists():
        raise UserError(f"run directory {p.run_dir} already holds a run; choose another "
                        f"--run-id or --out, or remove it")
    p.run_dir.mkdir(parents=True, exist_ok=True)
    timings = dict(p.timings)
    seed_everything(cfg.seed)

    t0 = time.perf_counter()
    if lm is None:
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code)
    timings["load_model_s"] = time.perf_counter() - t0
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
                  "n_layers": lm.n_layers, "dtype": str(lm.dtype), **lm.info},
        "versions": rec_io.package_versions(),
        "git": rec_io.git_revision(),
        "device": rec_io.device_description(lm.device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)

    original = _snapshot(lm, edited_layers(p.hparams))
    try:
        all_records, loop_timings = _edit_and_evaluate(p, lm, p.run_dir / rec_io.RECORDS,
                                                       original, log)
    finally:
        _restore(lm, original)  # the caller's model leaves unedited, whatever happened

    n = len(p.requests)
    edit_s, eval_s = loop_timings["edit_s"], loop_timings["evaluate_s"]
    timings.update(loop_timings)
    timings.update({"time_per_edit_s": edit_s / n,
                    "edits_per_s": n / edit_s if edit_s > 0 else None,
                    "eval_cases_per_s": n / eval_s if eval_s > 0 else None})
    if loop_timings.get("downstream_s"):
        timings["downstream_examples_per_s"] = (loop_timings["downstream_examples"]
                                                / loop_timings["downstream_s"])
    summary = p.suite.summarize(all_records)
    if wants_curve(cfg):
        manifest["curve"] = CURVE
    manifest.update({"status": "complete", "timings": timings,
                     "peak_memory": rec_io.peak_memory(lm.device), "summary": summary,
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
    log(format_summary(p.run_dir, cfg, summary, timings))
    return p.run_dir


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
        scores = downstream.evaluate_downstream(
            lm, cfg.downstream, data_dir(cfg.data_dir), limit=cfg.downstream_limit or None,
            num_fewshot=cfg.downstream_fewshot, batch_size=cfg.eval_batch_size)
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


def _edit_and_evaluate(p: Prepared, lm: LoadedModel, records_path: Path,
                       original: dict[int, torch.Tensor],
                       log: Callable[[str], None] = print
                       ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The loop proper; returns (records, timings: edit_s, evaluate_s, reference_s,
    downstream_s, downstream_examples, probe_s)."""
    cfg = p.cfg
    state: dict[str, Any] = {}
    timings = {"edit_s": 0.0, "evaluate_s": 0.0, "reference_s": 0.0, "downstream_s": 0.0,
               "downstream_examples": 0, "probe_s": 0.0}
    all_records: list[dict[str, Any]] = []
    pending: list[tuple[int, int, dict[str, Any]]] = []  # (index, batch, diag) awaiting eval
    index = 0

    lm.info["seed"] = cfg.seed  # methods draw their context prefixes from the run's seed
    reference = None
    if hasattr(p.suite, "reference"):  # the unedited model's own outputs, before any edit
        t0 = time.perf_counter()
        reference = p.suite.reference(lm, p.requests, batch_size=cfg.eval_batch_size)
        timings["reference_s"] = time.perf_counter() - t0

    def evaluate(part: list[tuple[int, int, dict[str, Any]]]) -> None:
        t0 = time.perf_counter()
        indices = [i for i, _, _ in part]
        metrics = p.suite.evaluate(lm, [p.requests[i] for i in indices],
                                   **_evaluate_kwargs(p, reference, indices, generation=True))
        timings["evaluate_s"] += time.perf_counter() - t0
        recs = [_case_record(cfg, i, b, m, d) for (i, b, d), m in zip(part, metrics, strict=True)]
        rec_io.append_records(records_path, recs)
        all_records.extend(recs)

    curve = wants_curve(cfg)

    def checkpoint(n_edits: int, batches_done: int, edits_in_model: int) -> None:
        line = _checkpoint(p, lm, reference, n_edits, batches_done, edits_in_model, timings)
        rec_io.append_records(p.run_dir / CURVE, [line])
        log(format_checkpoint(line))

    if curve:
        checkpoint(0, 0, 0)
    batches = _batches(p.requests, cfg.batch_size)
    last_checkpoint = 0
    for b, batch in enumerate(tqdm(batches, desc=f"{cfg.method} edit", unit="batch")):
        t0 = time.perf_counter()
        outcome = p.method.edit(lm, batch, p.hparams, state)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        timings["edit_s"] += time.perf_counter() - t0
        for phase, secs in outcome.timings.items():  # the method's own split of edit_s
            timings[f"edit_{phase}"] = timings.get(f"edit_{phase}", 0.0) + secs
        state = outcome.state if cfg.sequential else {}  # batch mode: every batch from scratch
        pending += [(index + j, b, d) for j, d in enumerate(outcome.diagnostics)]
        index += len(batch)
        if not cfg.sequential:
            evaluate(pending)
            pending = []
            if curve and b == len(batches) - 1:
                checkpoint(index, b + 1, len(batch))
            _restore(lm, original)
        elif cfg.eval_every > 0 and (b + 1) % cfg.eval_every == 0:
            checkpoint(index, b + 1, index)
            last_checkpoint = b + 1
    if cfg.sequential:
        if curve and last_checkpoint != len(batches):
            checkpoint(index, len(batches), index)
        chunk = max(cfg.batch_size, 50)
        for start in tqdm(range(0, len(pending), chunk), desc="evaluate", unit="chunk"):
            evaluate(pending[start:start + chunk])
    return all_records, timings


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
    parts = [f"{k}={v:.2f}" for k, v in summary.items()]
    tpe = timings.get("time_per_edit_s")
    cps = timings.get("eval_cases_per_s")
    return (f"{cfg.method} on {cfg.suite} ({cfg.model}, {cfg.n_edits} cases): "
            + " ".join(parts)
            + (f" | time/edit {tpe:.3f}s" if tpe is not None else "")
            + (f" | eval {cps:.1f} cases/s" if cps else "")
            + f"\nrecords: {run_dir}")
