"""Data of the report's per-case explorer (:mod:`reports.html`).

For every (suite, model) group of a report:

* each case's edit (subject, rewrite prompt, target and true objects) and its evaluation
  prompts with their references, exactly as :func:`suites.answers.request_items` pairs them
  with the generated answers, read through the suite's loader from the run's data file when it
  is on this machine with the SHA-256 the manifest records (else from ``$KEH_DATA_DIR`` under
  the suite's default file names, same hash); otherwise the explorer shows case ids and says
  why;
* per arm (method [preset]): the case's outcomes, each the mean over the arm's seeds of the
  value the tables average (:attr:`reports.load.Runs.frame`, failed edits by intention to
  treat; display scale of :func:`reports.tables.scale_of`): teacher-forced success per prompt
  group, generation-based exact match per group, the efficacy margin, rho and NKL where
  recorded; the number of seeds whose edit of the case failed; the greedy answers
  (:mod:`suites.answers`) and the fluency generations of the arm's first seed.

Nothing here pairs or tests: the explorer is descriptive, the inference is in the tables.

Encoding (:func:`encode`): one JSON document, every string once in a shared list (answers
repeat across arms and prompts across runs), numbers to 4 significant digits, gzip-compressed
and base64-encoded; the page decompresses it with the browser's ``DecompressionStream``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import UserError
from harness.paths import data_dir
from harness.runfiles import RECORDS
from reports.load import Runs, preset_of, seed_of, suite_of
from reports.tables import GENERATION, RATE_SUFFIXES, arm_label, scale_of

#: per-case outcomes beside the teacher-forced and generation-based ones (label, column)
EXTRA_METRICS = [("Margin", "efficacy_margin"), ("rho", "diag_rho"),
                 ("NKL", "neighborhood_kl")]
#: fluency generations kept per case and arm, and characters kept of each
MAX_GENERATIONS, GENERATION_CHARS = 3, 300


class Strings:
    """Every string of the document once; cells hold its index (None for missing)."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, text: Any) -> int | None:
        if text is None:
            return None
        text = str(text)
        i = self._index.get(text)
        if i is None:
            i = self._index[text] = len(self.values)
            self.values.append(text)
        return i


def metric_spec(suite: str, frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, column) of the per-case outcomes the group records: teacher-forced success per
    prompt group, then exact match per group (:data:`reports.tables.GENERATION`, without F1),
    then :data:`EXTRA_METRICS`."""
    gen = GENERATION.get(suite, [])
    spec = ([(label.removesuffix(" TF"), col) for label, col in gen if label.endswith(" TF")]
            + [(label, col) for label, col in gen if label.endswith(" EM")] + EXTRA_METRICS)
    return [(label, col) for label, col in spec
            if col in frame.columns and frame[col].notna().any()]


def _round(x: float) -> float | None:
    """4 significant digits; None for NaN (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_requests(m: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(case id -> EditRequest, note) of a run's data, or (None, why not)."""
    data, cfg = m.get("data") or {}, m.get("config") or {}
    suite, sha = suite_of(m), data.get("sha256")
    from suites import get_suite  # torch comes with the loaders: only when data is read

    try:
        module = get_suite(suite)
    except UserError:
        return None, f"No loader for suite {suite!r}, so prompts are not shown."
    candidates = [Path(data["path"])] if data.get("path") else []
    candidates += [data_dir() / name for name in getattr(module, "DEFAULT_FILES", [])]
    options = {kw: cfg[name] for kw, name in getattr(module, "LOAD_OPTIONS", {}).items()
               if cfg.get(name) is not None}
    for path in dict.fromkeys(candidates):
        if path.is_file() and (not sha or _sha256(path) == sha):
            return ({r.case_id: r for r in module.load(path, **options)},
                    f"Prompts and targets from {path}.")
    return None, (f"The data file {data.get('path')} (sha256 {str(sha)[:12]}) is not on this "
                  f"machine, so prompts and targets are not shown.")


def _extras(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """case id -> {answers, generations} of one run's records (empty where it has none)."""
    if run_dir is None or not (run_dir / RECORDS).exists():
        return {}
    out = {}
    with (run_dir / RECORDS).open(encoding="utf-8") as f:
        for line in f:
            if '"answers"' not in line and '"generations"' not in line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a killed writer's last line (load.py refuses runs)
                continue
            out[str(rec.get("case_id"))] = {"answers": rec.get("answers") or {},
                                            "generations": rec.get("generations") or []}
    return out


def _case_block(case_ids: list[str], requests: dict[str, Any] | None,
                s: Strings) -> dict[str, Any]:
    """Per case: id, subject, prompt, new and true objects, and the (prompt, reference) pairs
    per answer group (:func:`suites.answers.request_items`); None where no data file."""
    block: dict[str, Any] = {"id": [s(c) for c in case_ids]}
    if requests is None:
        return block
    from suites.answers import request_items

    reqs = [requests.get(c) for c in case_ids]
    items = [request_items([r])[0] if r is not None else None for r in reqs]
    block.update({
        "subject": [s(r.subject) if r else None for r in reqs],
        "prompt": [s(r.rewrite_prompt) if r else None for r in reqs],
        "new": [s(r.target_new) if r else None for r in reqs],
        "true": [s(r.target_true) if r else None for r in reqs],
        "items": [{g: [[s(p), s(ref)] for p, ref in pairs] for g, pairs in it.items()}
                  if it else None for it in items],
    })
    return block


def group_data(runs: Runs, s: Strings) -> dict[str, Any]:
    """The explorer's data of one (suite, model) group (module notes)."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    frame = frame.assign(label=[arm_label(a, p) for a, p in
                                zip(frame["arm"], frame["preset"], strict=True)])
    case_ids = list(dict.fromkeys(frame["case_id"].astype(str)))
    spec = metric_spec(suite, frame)
    first = next(iter(runs.manifests.values()))
    requests, note = load_requests(first)
    arms, values, failed, answers, generations = [], [], [], [], []
    for label, rows in frame.groupby("label", sort=False):
        means = rows.groupby("case_id", sort=False)[[c for _, c in spec]].mean()
        means = means.reindex(case_ids)
        values.append([[_round(scale_of(c) * v) for v in means[c].to_numpy(float)]
                       for _, c in spec])
        n_failed = rows.groupby("case_id", sort=False)["failed"].sum().reindex(case_ids)
        failed.append([int(v) if pd.notna(v) else None for v in n_failed])
        seeds = sorted({seed_of(runs.manifests[r]) for r in rows["run_id"].unique()},
                       key=lambda x: (x is None, x))
        run0 = next(r for r in rows["run_id"].unique()
                    if seed_of(runs.manifests[r]) == seeds[0])
        extra = _extras(runs.dirs.get(str(run0)))
        groups = list(dict.fromkeys(g for e in extra.values() for g in e["answers"]))
        answers.append({g: [[s(a) for a in (extra.get(c, {}).get("answers") or {}).get(g, [])]
                            for c in case_ids] for g in groups} if groups else None)
        gens = [[s(t[:GENERATION_CHARS]) for t in
                 (extra.get(c, {}).get("generations") or [])[:MAX_GENERATIONS]]
                for c in case_ids]
        generations.append(gens if any(gens) else None)
        arms.append({"label": str(label), "runs": int(rows["run_id"].nunique()),
                     "seeds": [x for x in seeds if x is not None],
                     "answer_seed": seeds[0], "answer_run": str(run0),
                     "preset": preset_of(runs.manifests[str(run0)])})
    batches = frame.drop_duplicates("case_id").set_index("case_id")["batch"].reindex(case_ids)
    return {"title": f"{suite} / {model}", "suite": suite, "model": model, "note": note,
            "arms": arms,
            "metrics": [{"label": lab, "column": c,
                         "kind": "rate" if c.endswith(RATE_SUFFIXES) else "real"}
                        for lab, c in spec],
            "cases": {**_case_block(case_ids, requests, s),
                      "batch": [int(b) if pd.notna(b) else None for b in batches]},
            "values": values, "failed": failed, "answers": answers,
            "generations": generations}


def case_data(groups: list[tuple[tuple[str, str], Runs]]) -> dict[str, Any]:
    """The explorer's document: every group's data and the shared string list."""
    s = Strings()
    out = [group_data(g, s) for _, g in groups]
    return {"version": 1, "groups": out, "strings": s.values}


def encode(document: Mapping[str, Any]) -> str:
    """gzip-compressed JSON in base64 (ASCII, safe inside a ``<script>`` element)."""
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def decode(text: str) -> dict[str, Any]:
    """The inverse of :func:`encode` (tests, tools)."""
    return json.loads(gzip.decompress(base64.b64decode(text)).decode("utf-8"))
