"""The edit/evaluate loop: one public entry point, :func:`run`, taking a :class:`RunConfig`.

Modes
* batch (``sequential=False``): for each batch, edit, evaluate that batch's cases, restore the
  edited weights; every batch starts from the unedited model.
* sequential: edits accumulate (the method's solver state is carried between batches); every
  case is evaluated once after the last batch (the protocol of MEMIT/AlphaEdit tables).
"""

from __future__ import annotations

import dataclasses
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
from suites import get_suite
from suites.data import find_data_file


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
    hparams, source = load_hparams(method.Hparams, cfg.method, cfg.model, cfg.hparams,
                                   cfg.hparams_overrides)
    run_dir = Path(cfg.out_dir) / (cfg.run_id or cfg.default_run_id())
    return Prepared(cfg, method, suite, path, requests, hparams, source, run_dir,
                    {"prepare_s": time.perf_counter() - t0})


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
        all_records, edit_s, eval_s = _edit_and_evaluate(p, lm, p.run_dir / rec_io.RECORDS,
                                                         original)
    finally:
        _restore(lm, original)  # the caller's model leaves unedited, whatever happened

    n = len(p.requests)
    timings.update({"edit_s": edit_s, "evaluate_s": eval_s,
                    "time_per_edit_s": edit_s / n,
                    "eval_cases_per_s": n / eval_s if eval_s > 0 else None})
    summary = p.suite.summarize(all_records)
    manifest.update({"status": "complete", "timings": timings,
                     "peak_memory": rec_io.peak_memory(lm.device), "summary": summary,
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    rec_io.write_json(p.run_dir / rec_io.MANIFEST, manifest)
    log(format_summary(p.run_dir, cfg, summary, timings))
    return p.run_dir


def _edit_and_evaluate(p: Prepared, lm: LoadedModel, records_path: Path,
                       original: dict[int, torch.Tensor]
                       ) -> tuple[list[dict[str, Any]], float, float]:
    """The loop proper; returns (records, edit seconds, evaluation seconds)."""
    cfg = p.cfg
    state: dict[str, Any] = {}
    edit_s = eval_s = 0.0
    all_records: list[dict[str, Any]] = []
    pending: list[tuple[int, int, dict[str, Any]]] = []  # (index, batch, diag) awaiting eval
    index = 0

    def evaluate(part: list[tuple[int, int, dict[str, Any]]]) -> None:
        nonlocal eval_s
        t0 = time.perf_counter()
        metrics = p.suite.evaluate(lm, [p.requests[i] for i, _, _ in part],
                                   batch_size=cfg.eval_batch_size)
        eval_s += time.perf_counter() - t0
        recs = [_case_record(cfg, i, b, m, d) for (i, b, d), m in zip(part, metrics, strict=True)]
        rec_io.append_records(records_path, recs)
        all_records.extend(recs)

    batches = _batches(p.requests, cfg.batch_size)
    for b, batch in enumerate(tqdm(batches, desc=f"{cfg.method} edit", unit="batch")):
        t0 = time.perf_counter()
        outcome = p.method.edit(lm, batch, p.hparams, state)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        edit_s += time.perf_counter() - t0
        state = outcome.state
        pending += [(index + j, b, d) for j, d in enumerate(outcome.diagnostics)]
        index += len(batch)
        if not cfg.sequential:
            evaluate(pending)
            pending = []
            _restore(lm, original)
    if cfg.sequential:
        chunk = max(cfg.batch_size, 50)
        for start in tqdm(range(0, len(pending), chunk), desc="evaluate", unit="chunk"):
            evaluate(pending[start:start + chunk])
    return all_records, edit_s, eval_s


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
