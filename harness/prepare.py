"""Validation and preparation of a run: everything checked before a model is loaded."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import validation
from harness.config import RunConfig
from harness.errors import UserError
from harness.models import LoadedModel, context_length, peek_config, resolve_device
from harness.paths import data_dir
from methods import get_method
from methods.base import EditRequest, load_hparams
from suites import downstream, get_suite, load_kwargs
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
    """Validate config, device, method, suite, data, hparams (types, ranges, layer indices
    against the model's config where it can be read without weights) and the run directory;
    nothing heavy, nothing written."""
    t0 = time.perf_counter()
    cfg.validate()
    resolve_device(cfg.device)
    method = get_method(cfg.method)
    suite = get_suite(cfg.suite)
    run_dir = validation.run_directory(cfg.out_dir, cfg.run_id or cfg.default_run_id())
    path = find_data_file(cfg.suite, suite.DEFAULT_FILES, suite.CANONICAL_URL,
                          directory=cfg.data_dir, explicit=cfg.data)
    try:
        all_requests = suite.load(path, **load_kwargs(suite, cfg))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte offset {exc.start}); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8") from exc
    if cfg.start + cfg.n_edits > len(all_requests):
        n = len(all_requests)
        raise UserError(
            f"cases {cfg.start}..{cfg.start + cfg.n_edits - 1} (--start {cfg.start}, "
            f"--n-edits {cfg.n_edits}) run past the {n} records in {path}; "
            + (f"use at most --n-edits {n - cfg.start}" if cfg.start < n else
               f"--start must be below {n}"))
    requests = all_requests[cfg.start:cfg.start + cfg.n_edits]
    if cfg.generation_tokens and not _accepts(suite.evaluate, "generation_tokens"):
        raise UserError(f"--generation-tokens: suite {cfg.suite!r} has no generation metrics")
    if cfg.downstream:
        downstream.check_tasks(cfg.downstream, data_dir(cfg.data_dir), cfg.downstream_fewshot)
    if cfg.hparams is not None:
        validation.check_hparams_file(cfg.hparams)
    hparams, source = load_hparams(method.Hparams, cfg.method, cfg.model, cfg.hparams,
                                   cfg.hparams_overrides, preset=cfg.preset)
    config = peek_config(cfg.model, cfg.trust_remote_code)
    if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
        validation.check_layers(hparams, config.num_hidden_layers, cfg.model)
    return Prepared(cfg, method, suite, path, requests, hparams, source, run_dir,
                    {"prepare_s": time.perf_counter() - t0})


def check_model(p: Prepared, lm: LoadedModel) -> None:
    """Checks that need the loaded model (before anything is written): layer indices against
    its layer count, prompt lengths against its context."""
    validation.check_layers(p.hparams, lm.n_layers, p.cfg.model)
    # a method's generated context prefixes (tokens) go before the prompt
    lengths = [getattr(p.hparams, "context_length", None) or 0,
               *(t[0] for t in getattr(p.hparams, "context_templates", None) or () if t)]
    margin = int(max(lengths))
    validation.check_lengths(p.requests, lm.tokenizer, context_length(lm.model.config),
                             p.data_path, p.cfg.start, p.cfg.generation_tokens, margin)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    return name in inspect.signature(fn).parameters


def wants_curve(cfg: RunConfig) -> bool:
    """Whether the run writes checkpoints to ``curve.jsonl``."""
    return bool(cfg.downstream) or (cfg.sequential and cfg.eval_every > 0)


