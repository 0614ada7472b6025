"""Run directories -> one tidy pandas frame (one row per case x run), plus the manifests.

A run directory (see :mod:`harness.runner`) holds ``manifest.json``, ``records.jsonl`` and, for
sequential runs with checkpoints, ``curve.jsonl``. :func:`load_runs` reads any number of them,
refuses incomplete or inconsistent runs with a :class:`~harness.errors.UserError`, and returns a
:class:`Runs`: the case frame, the manifests by run id and a tidy frame of curve checkpoints.

Columns of :attr:`Runs.frame`: ``run_id, arm, preset, method, solver, suite, model,
model_sha256, data_sha256, seed, sequential, batch_size, case_index, case_id, batch, failed,
error``, every scalar metric of the records (``efficacy_success``, ``efficacy_margin``, ...) and
every per-edit diagnostic flattened as ``diag_<name>``. Raw log-probabilities are not loaded.

Failed edits (``failed: true``) are scored by intention to treat: 0 in the edit's own success
rates (:data:`suites.itt.EDIT_SUCCESS_RATES`), and every other outcome (margin, magnitudes,
locality, fluency) is the value keh measured on the model the failure left (batch mode: the
unedited model; sequential: the final model), so no mean or paired test drops them. Runs from
before keh measured failed cases have no such values; :mod:`reports.paired` counts those cases
and every table says so. Diagnostics stay missing (no edit was made).

The *preset* is the run's ``config.preset`` ("faithful" or "tuned"); manifests written before
presets existed have none and are labelled ``"legacy"``. Runs of different presets are
different arms: the report compares them only within a preset.

The *arm* names what is compared: the method name, except that a ``metake`` run whose hparams
choose a lower-level ``solver`` other than AlphaEdit becomes ``metake-<solver>`` (the same name
a dedicated method would carry), so that T7 of ``docs/METAKE.md`` finds its runs either way;
a MetaKE run (or ablation) with BLUE's ``write_plan: blue`` gets the suffix ``-blue``
(``metake-blue`` over AlphaEdit-BLUE, ``metake-memit-blue`` over MEMIT-BLUE).

:func:`check_comparable` is the guard in front of every paired comparison: runs compared case by
case must share suite, data file hash, case ids in the same order, batching and model weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import UserError
from harness.runfiles import CURVE, MANIFEST, RECORDS
from suites.itt import EDIT_SUCCESS_RATES

#: identity columns of the case frame (everything else is a metric or a diagnostic)
ID_COLUMNS = ["run_id", "arm", "preset", "method", "solver", "suite", "model",
              "model_sha256", "data_sha256", "seed", "sequential", "batch_size",
              "case_index", "case_id", "batch", "failed", "error"]
#: record fields that are neither metrics nor loaded
SKIP_FIELDS = {"logprobs", "diagnostics", "answers", "generations", "method", "suite",
               "model", "seed", "case_index", "case_id", "batch", "failed", "error"}
DIAG_PREFIX = "diag_"
LEGACY_PRESET = "legacy"


@dataclass
class Runs:
    """Loaded runs: ``frame`` (cases), ``manifests`` and ``dirs`` by run id, ``curves``."""

    frame: pd.DataFrame
    manifests: dict[str, dict[str, Any]]
    dirs: dict[str, Path] = field(default_factory=dict)
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    _arms: dict[str, pd.DataFrame] | None = field(default=None, repr=False, compare=False)
    #: memo of derived tables (reports.claims.pair); the frame is never modified in place
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def run_ids(self) -> list[str]:
        return list(self.manifests)

    def subset(self, run_ids: Iterable[str]) -> Runs:
        """The same object restricted to ``run_ids`` (order kept)."""
        keep = [r for r in self.manifests if r in set(run_ids)]
        frame = self.frame[self.frame["run_id"].isin(keep)].reset_index(drop=True)
        curves = (self.curves[self.curves["run_id"].isin(keep)].reset_index(drop=True)
                  if not self.curves.empty else self.curves)
        return Runs(frame, {r: self.manifests[r] for r in keep},
                    {r: self.dirs[r] for r in keep if r in self.dirs}, curves)

    def groups(self) -> list[tuple[tuple[str, str], Runs]]:
        """One :class:`Runs` per (suite, model name): the units a report compares within."""
        keys: dict[tuple[str, str], list[str]] = {}
        for rid, m in self.manifests.items():
            keys.setdefault((suite_of(m), model_name_of(m)), []).append(rid)
        return [(k, self.subset(v)) for k, v in keys.items()]

    def rows_of(self, arm: str) -> pd.DataFrame:
        """The frame's rows of one arm (cached; empty if the arm is absent)."""
        if self._arms is None:
            self._arms = {str(a): g for a, g in self.frame.groupby("arm", sort=False)}
        return self._arms.get(arm, self.frame.iloc[0:0])

    def arm_of(self, run_id: str) -> str:
        return arm_of(self.manifests[run_id])

    def presets(self) -> list[tuple[str, Runs]]:
        """One :class:`Runs` per preset (the units compared case by case)."""
        keys: dict[str, list[str]] = {}
        for rid, m in self.manifests.items():
            keys.setdefault(preset_of(m), []).append(rid)
        return [(k, self.subset(v)) for k, v in keys.items()]


# ---------------------------------------------------------------- manifest accessors
def suite_of(m: Mapping[str, Any]) -> str:
    return str((m.get("config") or {}).get("suite") or m.get("suite") or "?")


def model_name_of(m: Mapping[str, Any]) -> str:
    return str((m.get("model") or {}).get("name") or (m.get("config") or {}).get("model") or "?")


def method_of(m: Mapping[str, Any]) -> str:
    return str(m.get("method") or (m.get("config") or {}).get("method") or "?")


def solver_of(m: Mapping[str, Any]) -> str | None:
    solver = (m.get("hparams") or {}).get("solver")
    return None if solver is None else str(solver)


def arm_of(m: Mapping[str, Any]) -> str:
    """The compared unit: the method name; ``metake`` with a non-AlphaEdit ``solver`` hparam
    becomes ``metake-<solver>``, and a MetaKE arm with ``write_plan: blue`` ends in ``-blue``."""
    method, solver = method_of(m), solver_of(m)
    arm = method
    if method == "metake" and solver not in (None, "alphaedit"):
        arm = f"metake-{solver}"
    if method.startswith("metake") and (m.get("hparams") or {}).get("write_plan") == "blue":
        arm += "-blue"
    return arm


def preset_of(m: Mapping[str, Any]) -> str:
    """``config.preset`` of a run; ``"legacy"`` for manifests from before presets."""
    preset = (m.get("config") or {}).get("preset")
    return LEGACY_PRESET if preset in (None, "") else str(preset)


def seed_of(m: Mapping[str, Any]) -> int | None:
    seed = m.get("seed", (m.get("config") or {}).get("seed"))
    return None if seed is None else int(seed)


# ---------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole lines of a JSONL file; a trailing partial line (a killed writer) is ignored."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    out = []
    for i, line in enumerate(raw[:end].decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {i + 1}: not valid JSON ({exc.msg})") from exc
    return out


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{run_dir} is not a run directory (no {MANIFEST}); give directories "
                        f"written by `keh run`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from exc


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``; a directory without a manifest but with run
    directories directly inside it (e.g. ``runs/benchmark``) stands for those, except the ones
    the benchmark set aside as stale (``<run>.stale-<n>``; name them explicitly to include
    them)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such directory")
        if (p / MANIFEST).exists() or not p.is_dir():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir()
                          if (c / MANIFEST).exists() and ".stale-" not in c.name)
        if not children:
            raise UserError(f"{p} is not a run directory (no {MANIFEST}) and holds none")
        out.extend(children)
    return out


def _flatten_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in rec.items():
        if k in SKIP_FIELDS or isinstance(v, dict | list):
            continue
        row[k] = v
    for k, v in (rec.get("diagnostics") or {}).items():
        if not isinstance(v, dict | list):
            row[DIAG_PREFIX + k] = v
    return row


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """(manifest, case frame, curve frame) of one complete run; a clear error otherwise."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    rid = str(m.get("run_id") or run_dir.name)
    status = m.get("status")
    if status != "complete":
        raise UserError(f"run {rid} ({run_dir}) is incomplete (status {status!r}): it is still "
                        f"running or was interrupted; finish it (rerun the same `keh run` "
                        f"command) or leave it out of the report")
    records = _read_jsonl(run_dir / RECORDS)
    return m, run_frame(m, records, run_dir), _load_curve(run_dir / CURVE, rid, arm_of(m))


def run_frame(m: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
              run_dir: str | Path = "(in memory)") -> pd.DataFrame:
    """The case frame of one run from its manifest and records (what :func:`load_run` reads
    from disk); a clear error for damaged runs."""
    rid = str(m.get("run_id") or Path(run_dir).name)
    data = m.get("data") or {}
    case_ids = [str(c) for c in data.get("case_ids") or []]
    if case_ids and len(records) != len(case_ids):
        raise UserError(f"run {rid} ({run_dir}): {len(records)} records for {len(case_ids)} "
                        f"cases in its manifest; the run directory is damaged")
    if not records:
        raise UserError(f"run {rid} ({run_dir}) has no records")
    cfg = m.get("config") or {}
    ident = {"run_id": rid, "arm": arm_of(m), "preset": preset_of(m), "method": method_of(m),
             "solver": solver_of(m),
             "suite": suite_of(m), "model": model_name_of(m),
             "model_sha256": (m.get("model") or {}).get("sha256"),
             "data_sha256": data.get("sha256"), "seed": seed_of(m),
             "sequential": bool(cfg.get("sequential", False)),
             "batch_size": cfg.get("batch_size")}
    rows = []
    for i, rec in enumerate(records):
        row = dict(ident)
        row.update({"case_index": rec.get("case_index", i),
                    "case_id": str(rec.get("case_id", case_ids[i] if case_ids else i)),
                    "batch": rec.get("batch"), "failed": bool(rec.get("failed", False)),
                    "error": rec.get("error")})
        row.update(_flatten_record(rec))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame["case_id"].duplicated().any():
        dup = frame.loc[frame["case_id"].duplicated(), "case_id"].iloc[0]
        raise UserError(f"run {rid} ({run_dir}): case {dup!r} appears more than once")
    if case_ids and list(frame["case_id"]) != case_ids:
        # records are appended in evaluation order; order them as the manifest lists cases
        if set(frame["case_id"]) != set(case_ids):
            raise UserError(f"run {rid} ({run_dir}): the case ids of records.jsonl differ from "
                            f"the manifest's data.case_ids")
        frame = frame.set_index("case_id").loc[case_ids].reset_index()
    return frame


def _load_curve(path: Path, run_id: str, arm: str) -> pd.DataFrame:
    """Tidy checkpoints: run_id, arm, n_edits, edits_in_model, batch, kind
    (downstream|probe|memory), name, value, n. ``edits_in_model``: the edits the evaluated model
    holds (batch mode: one batch), None in older checkpoints (see
    :func:`reports.tables.downstream_table`)."""
    rows = []
    for point in _read_jsonl(path):
        n_edits = point.get("n_edits_so_far")
        base = {"run_id": run_id, "arm": arm, "n_edits": n_edits,
                "edits_in_model": point.get("edits_in_model"),
                "batch": point.get("batch")}
        for task, res in (point.get("downstream") or {}).items():
            res = res if isinstance(res, dict) else {"acc": res}
            rows.append({**base, "kind": "downstream", "name": task, "value": res.get("acc"),
                         "n": res.get("n")})
        for kind in ("probe", "memory"):
            for name, value in (point.get(kind) or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    rows.append({**base, "kind": kind, "name": name, "value": value, "n": None})
    return pd.DataFrame(rows)


def load_runs(run_dirs: Iterable[str | Path]) -> Runs:
    """Load run directories (or folders of them) into one :class:`Runs`."""
    dirs = expand_run_dirs(run_dirs)
    if not dirs:
        raise UserError("no run directories given")
    frames, curves, manifests, where = [], [], {}, {}
    for d in dirs:
        m, frame, curve = load_run(d)
        rid = str(m.get("run_id") or Path(d).name)
        if rid in manifests:
            raise UserError(f"run {rid} given twice ({where[rid]} and {d})")
        manifests[rid], where[rid] = m, Path(d)
        frames.append(frame)
        if not curve.empty:
            curves.append(curve)
    return combine(frames, manifests, where, curves)


def combine(frames: Sequence[pd.DataFrame], manifests: dict[str, dict[str, Any]],
            where: dict[str, Path] | None = None,
            curves: Sequence[pd.DataFrame] = ()) -> Runs:
    """One :class:`Runs` from per-run case frames (:func:`run_frame`): numeric metric
    columns, failed edits scored by intention to treat."""
    frame = pd.concat(frames, ignore_index=True, sort=False)
    numeric = [c for c in frame.columns if c not in ID_COLUMNS]
    for c in numeric:  # metrics and diagnostics: floats, null -> NaN (never object columns)
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    frame = intention_to_treat(frame)
    curve = pd.concat(list(curves), ignore_index=True) if curves else pd.DataFrame()
    return Runs(frame, manifests, dict(where or {}), curve)


def intention_to_treat(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed edits score 0 in the edit's success rates
    (:data:`suites.itt.EDIT_SUCCESS_RATES`, those the frame has); their other outcomes
    are the values measured on the model the failure left (the records carry them), the rule
    of :func:`suites.itt.intention_to_treat`."""
    failed = frame["failed"].astype(bool).to_numpy()
    if failed.any():
        frame = frame.copy()
        for c in EDIT_SUCCESS_RATES:
            if c in frame.columns:
                frame.loc[failed, c] = 0.0
    return frame


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Metric columns (numeric, not identity, not diagnostics), in frame order."""
    return [c for c in frame.columns if c not in ID_COLUMNS and not c.startswith(DIAG_PREFIX)
            and pd.api.types.is_numeric_dtype(frame[c])]


def diagnostic_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(DIAG_PREFIX)
            and pd.api.types.is_numeric_dtype(frame[c]) and frame[c].notna().any()]


# ---------------------------------------------------------------- comparability
def _design(m: Mapping[str, Any], same_batches: bool = True) -> dict[str, Any]:
    cfg, data = m.get("config") or {}, m.get("data") or {}
    ids = [str(c) for c in data.get("case_ids") or []]
    design = {"suite": suite_of(m), "data sha256": data.get("sha256"),
              "case ids": ids if same_batches else sorted(ids)}
    if same_batches:
        design |= {"batch size": cfg.get("batch_size"), "sequential": cfg.get("sequential")}
    return design


def _describe(key: str, a: Any, b: Any) -> str:
    if key == "case ids":
        if set(a) != set(b):
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            return (f"case ids: {len(a)} vs {len(b)} cases"
                    + (f", only in the first {only_a[:3]}" if only_a else "")
                    + (f", only in the second {only_b[:3]}" if only_b else ""))
        if len(a) != len(b):
            return f"case ids: {len(a)} vs {len(b)} entries (a case repeated)"
        return "case ids: same cases in a different order"
    if key.endswith("sha256"):
        a, b = (str(x)[:12] if x else x for x in (a, b))
    return f"{key}: {a!r} vs {b!r}"


def design_differences(a: Mapping[str, Any], b: Mapping[str, Any],
                same_model: bool = True, same_batches: bool = True) -> list[str]:
    """What makes manifests ``a`` and ``b`` unfit for a case-by-case comparison: suite, data
    file, case ids (in order, with batch size and mode, when ``same_batches``; as a set
    otherwise) and, when ``same_model``, the model weights' sha256."""
    da, db = _design(a, same_batches), _design(b, same_batches)
    if same_model:
        da["model sha256"] = (a.get("model") or {}).get("sha256")
        db["model sha256"] = (b.get("model") or {}).get("sha256")
    return [_describe(k, da[k], db[k]) for k in da if da[k] != db[k]]


def check_comparable(runs: Runs | Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
                     same_model: bool = True) -> None:
    """Raise :class:`UserError` unless all runs can be compared case by case.

    They must share suite, data file sha256, case ids in the same order, batch size and mode
    (the same batches), and, when ``same_model``, the model's sha256 (the same weights: runs of
    a random model with different seeds hold different weights). The message names the runs
    and every difference. ``runs`` is a :class:`Runs`, a mapping run id -> manifest or a list
    of manifests.
    """
    if isinstance(runs, Runs):
        manifests = runs.manifests
    elif isinstance(runs, Mapping):
        manifests = dict(runs)
    else:
        manifests = {str(m.get("run_id", i)): m for i, m in enumerate(runs)}
    items = list(manifests.items())
    if len(items) < 2:
        return
    ref_id, ref = items[0]
    problems = []
    for rid, m in items[1:]:
        diff = design_differences(ref, m, same_model=same_model)
        if diff:
            problems.append(f"{ref_id} vs {rid}: " + "; ".join(diff))
    if problems:
        raise UserError("runs are not comparable case by case (they must share suite, data, "
                        "case ids and order, batching" + (", model weights" if same_model else "")
                        + "): " + " | ".join(problems)
                        + ". Report them separately or rerun them on the same design.")


def case_ids_hash(m: Mapping[str, Any]) -> str:
    """A short fingerprint of a run's ordered case ids (for the report's provenance table)."""
    ids = "\n".join(str(c) for c in (m.get("data") or {}).get("case_ids") or [])
    return hashlib.sha256(ids.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- code revisions
def revisions_of(m: Mapping[str, Any]) -> list[str]:
    """The code revisions a run was made with, in order: its start's git commit (``+dirty``
    with uncommitted changes) and that of every resume that changed it."""
    def rev(git: Mapping[str, Any] | None) -> str:
        git = git or {}
        commit = str(git.get("commit") or "unknown")[:8]
        return commit + ("+dirty" if git.get("dirty") else "")

    out = [rev(m.get("git"))]
    for entry in m.get("resumed") or []:
        if isinstance(entry, Mapping) and entry.get("git"):
            r = rev(entry["git"])
            if r != out[-1]:
                out.append(r)
    return out


def revision_notes(runs: Runs) -> list[str]:
    """Lines that flag mixed code: an arm whose runs come from different revisions, a run
    resumed under another revision, and arms compared across revisions (empty when every
    run of every arm was made, start to end, by one revision)."""
    by_arm: dict[str, dict[str, list[str]]] = {}
    notes = []
    for rid, m in runs.manifests.items():
        revs = revisions_of(m)
        label = f"{arm_of(m)} [{preset_of(m)}]"
        by_arm.setdefault(label, {})
        for r in revs:
            by_arm[label].setdefault(r, []).append(rid)
        if len(revs) > 1:
            notes.append(f"run {rid} ({label}) was resumed across code revisions "
                         f"{' -> '.join(revs)}")
    for label, revs in by_arm.items():
        if len(revs) > 1:
            notes.append(f"the runs of {label} come from {len(revs)} code revisions: "
                         + "; ".join(f"{r} ({', '.join(sorted(set(v)))})"
                                     for r, v in revs.items()))
    every = {r for revs in by_arm.values() for r in revs}
    if len(every) > 1 and len(by_arm) > 1:
        notes.append("arms compared here come from different code revisions: "
                     + "; ".join(f"{label}: {', '.join(revs)}" for label, revs in
                                 by_arm.items()))
    return notes
