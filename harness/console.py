"""The benchmark's final console table: per suite and model, each method's main columns as
the report names them (``reports.tables.COLUMNS``: Eff/Gen/Spe, Flu and Consis where
generated), with the report's 95% intervals at the design's inference unit, and the wall
time of each run. The full tables, paired tests and claims are in the report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.progress import minutes

#: phases of a run's manifest timings that add up to its wall time (resumes included)
PHASES = ("load_model_s", "reference_s", "edit_s", "evaluate_s", "downstream_s", "probe_s")

def run_seconds(manifest: Mapping[str, Any]) -> float:
    """Seconds a run spent in its phases (summed over resumes)."""
    t = manifest.get("timings") or {}
    return float(sum(t.get(k) or 0.0 for k in PHASES))


def summary(run_dirs: Iterable[Path], n_resamples: int = 2000) -> str:
    """Markdown tables, one per (suite, model), of the complete runs in ``run_dirs``."""
    from reports import tables
    from reports.load import load_runs

    runs = load_runs(run_dirs)
    out = []
    for (suite, model), g in runs.groups():
        table = tables.main_table(g, n_resamples=n_resamples, seed=0)
        if table is None:
            continue
        disp = table.display.drop(columns="runs")
        if not table.raw["n_failed"].any():
            disp = disp.drop(columns="n_failed")
        disp["time per run"] = [_times(g, label) for label in table.raw["method"]]
        out += [f"{suite} / {model}: mean over cases and seeds, x100, with 95% interval; "
                f"unit: {tables.resampling_unit(g.frame)}", "",
                disp.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)


def _times(runs: Any, label: str) -> str:
    """The wall time of each run of the arm shown as ``label`` ("arm [preset]")."""
    from reports.load import preset_of
    from reports.tables import arm_label

    ids = [rid for rid, m in runs.manifests.items()
           if arm_label(runs.arm_of(rid), preset_of(m)) == label]
    return ", ".join(minutes(run_seconds(runs.manifests[rid])) for rid in ids)
