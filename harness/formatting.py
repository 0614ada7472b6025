"""One-line console summaries of checkpoints and finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.config import RunConfig


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
