"""The edit/evaluate loop proper (batch and sequential modes, checkpoints, failed batches)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import UserError
from harness.formatting import format_checkpoint
from harness.models import LoadedModel, cache_dir
from harness.paths import data_dir
from harness.prepare import Prepared, wants_curve
from methods.base import EditRequest
from suites import downstream

CURVE = rec_io.CURVE
#: size of the fixed probe set of earlier edits re-evaluated at each sequential checkpoint
PROBE_SIZE = 20


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def edited_weights(lm: LoadedModel, hparams: Any) -> dict[str, torch.Tensor]:
    """Live (d_out, d_in) views of every weight a method may change, by checkpoint key: the
    rewrite matrix of each of the hparams' ``layers`` (``weight.<layer>``) and each linear
    module named in ``edit_modules`` (``weight.<name>``; UltraEdit's gate/up projections).
    Fetched afresh at each use, so a method that replaces a parameter is still followed."""
    views = {f"weight.{layer}": lm.rewrite_weight(layer)
             for layer in getattr(hparams, "layers", []) or []}
    views.update({f"weight.{name}": lm.linear_weight(name)
                  for name in getattr(hparams, "edit_modules", []) or []})
    return views


def snapshot_weights(lm: LoadedModel, hparams: Any) -> dict[str, torch.Tensor]:
    return {k: w.detach().clone() for k, w in edited_weights(lm, hparams).items()}


def restore_weights(lm: LoadedModel, hparams: Any, snap: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, w in edited_weights(lm, hparams).items():
            w.copy_(snap[k])


def _batches(items: list[EditRequest], size: int) -> list[list[EditRequest]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _case_record(cfg: RunConfig, index: int, batch: int, metrics: dict[str, Any],
                 diag: dict[str, Any]) -> dict[str, Any]:
    return {"method": cfg.method, "suite": cfg.suite, "model": cfg.model, "seed": cfg.seed,
            "case_index": cfg.start + index, "batch": batch, **metrics, "diagnostics": diag}



class RunError(UserError):
    """The run stopped on an editing error (``--stop-on-error``)."""


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
    if generation and p.cfg.answer_tokens > 0:
        kwargs["answer_tokens"] = p.cfg.answer_tokens
    if generation and p.cfg.generation_tokens > 0:
        kwargs["generation_tokens"] = p.cfg.generation_tokens
        kwargs["decoding"] = p.cfg.fluency_decoding
        kwargs["seed"] = p.cfg.seed
    return kwargs


def _checkpoint(p: Prepared, lm: LoadedModel, reference: list[dict[str, Any]] | None,
                n_edits: int, batches_done: int, edits_in_model: int,
                timings: dict[str, float]) -> dict[str, Any]:
    """One curve line: downstream scores and (sequential mode) the probe-set summary."""
    cfg = p.cfg
    line: dict[str, Any] = {"n_edits_so_far": n_edits, "batch": batches_done,
                            "edits_in_model": edits_in_model,
                            "memory": rec_io.memory_now(lm.device)}
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


def _edit_and_evaluate(p: Prepared, lm: LoadedModel, original: dict[str, torch.Tensor],
                       saved: tuple[ckpt.Progress, dict[str, torch.Tensor]] | None,
                       log: Callable[[str], None] = print) -> dict[str, float]:
    """The loop proper, from the checkpoint ``saved`` if given; records go to records.jsonl.
    Returns timings: edit_s, evaluate_s, reference_s, downstream_s, downstream_examples,
    probe_s and the method's own edit_<phase>."""
    cfg = p.cfg
    records_path, curve_path = p.run_dir / rec_io.RECORDS, p.run_dir / CURVE
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
        weights = edited_weights(lm, p.hparams)
        missing = sorted(set(weights) - set(tensors)) if cfg.sequential else []
        if missing:
            raise UserError(f"checkpoint of {p.run_dir} lacks {', '.join(missing)} (written "
                            f"by a revision that did not edit them); start the run afresh")
        with torch.no_grad():
            for k, w in weights.items():
                if k in tensors:
                    w.copy_(tensors[k])
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
            tensors.update(edited_weights(lm, p.hparams))
            tensors.update({f"state.{k}": v for k, v in state.items()})
        ckpt.save(p.run_dir, prog, tensors)

    def evaluate(part: list[dict[str, Any]]) -> None:
        """Evaluate every case of ``part``, failed edits included (intention to treat: their
        outcomes on the model the failure left); append their records."""
        metrics: list[dict[str, Any]] = []
        if part:
            t0 = time.perf_counter()
            indices = [e["index"] for e in part]
            metrics = p.suite.evaluate(lm, [p.requests[i] for i in indices],
                                       **_evaluate_kwargs(p, reference, indices,
                                                          generation=True))
            timings["evaluate_s"] += time.perf_counter() - t0
        recs = [_failed_record(p, e, m) if "error" in e
                else _case_record(cfg, e["index"], e["batch"], m, e["diagnostics"])
                for e, m in zip(part, metrics, strict=True)]
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
        before = snapshot_weights(lm, p.hparams) if cfg.sequential else original
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
            restore_weights(lm, p.hparams, before)
            entries = [{"index": first + j, "batch": b, "error": error}
                       for j in range(len(batch))]
        if not cfg.sequential:
            evaluate(entries)
            if curve and b == len(batches) - 1:
                checkpoint(first + len(batch), b + 1, len(batch) if error is None else 0)
            restore_weights(lm, p.hparams, original)
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


def _failed_record(p: Prepared, entry: dict[str, Any],
                   metrics: dict[str, Any]) -> dict[str, Any]:
    """The record of a case whose batch failed: its outcomes measured on the model the
    failure left (batch mode: the unedited weights; sequential: the final model), the error,
    no diagnostics. The report scores its edit rates 0 (intention to treat,
    :func:`suites.itt.intention_to_treat`)."""
    rec = _case_record(p.cfg, entry["index"], entry["batch"], metrics, {})
    rec.update({"case_id": p.requests[entry["index"]].case_id, "failed": True,
                "error": entry["error"]})
    return rec
