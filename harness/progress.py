"""The grid's overall progress line: runs done, edits done, time spent and an ETA.

The ETA weighs every run by what it costs: its edits times the method's seconds per edit as
measured on the 100-case SmolLM2 table (CPU, one thread per run, two runs at a time;
``methods/hparams/README.md``), plus its evaluation. Before any edit of this session is done,
that table itself gives the estimate (labelled a CPU estimate); after, the time actually spent
on the work done so far scales it to this machine. Runs found complete are not counted as
work done in this session.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness import records as rec_io
from harness.checkpoint import CHECKPOINT_DIR, PROGRESS
from harness.config import RunConfig

#: seconds per edit, measured on the 100-case table (one thread per run, two runs at a time)
SECONDS_PER_EDIT = {
    "noop": 0.0, "ft": 2.0, "rome": 16.7, "r-rome": 11.7, "memit": 9.5, "prune": 11.9,
    "rect": 5.8, "memit-blue": 11.5, "emmet": 5.6, "alphaedit": 5.8, "alphaedit-blue": 10.0,
    "alphaedit-rescaled": 5.4, "metake-noproxy": 8.5, "metake": 9.4,
}
#: methods not in the table
DEFAULT_SECONDS_PER_EDIT = 10.0
#: evaluation per case (teacher-forced and greedy answers; fluency texts add more)
EVAL_SECONDS_PER_CASE = 1.0


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.default_run_id()


def weight(cfg: RunConfig) -> float:
    """Expected seconds of a run on the measured CPU (one thread)."""
    per_edit = SECONDS_PER_EDIT.get(cfg.method, DEFAULT_SECONDS_PER_EDIT)
    return cfg.n_edits * (per_edit + EVAL_SECONDS_PER_CASE)


def _status(d: Path) -> str | None:
    try:
        return json.loads((d / rec_io.MANIFEST).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None


def edits_done(cfg: RunConfig) -> int:
    """Edits of the run written so far: all when complete, else from its checkpoint."""
    d = run_dir(cfg)
    if _status(d) == "complete":
        return cfg.n_edits
    try:
        done = json.loads((d / CHECKPOINT_DIR / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return min(cfg.n_edits, int(done.get("batches_done", 0)) * cfg.batch_size)


def minutes(seconds: float) -> str:
    """``"42 s"``, ``"7 min"``, ``"1 h 05 min"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    m = round(seconds / 60)
    return f"{m} min" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class GridProgress:
    """Progress of ``configs`` since this object was made (``jobs`` runs at a time)."""

    def __init__(self, configs: Sequence[RunConfig], jobs: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.configs, self.jobs, self.clock = list(configs), max(1, jobs), clock
        self.started = clock()
        self.before = [edits_done(c) for c in self.configs]

    def line(self) -> str:
        done = [edits_done(c) for c in self.configs]
        runs = sum(_status(run_dir(c)) == "complete" for c in self.configs)
        total = sum(c.n_edits for c in self.configs)
        share = [weight(c) / c.n_edits for c in self.configs]
        work_done = sum(w * (d - b) for w, d, b in zip(share, done, self.before, strict=True))
        work_left = sum(w * (c.n_edits - d) for w, c, d in zip(share, self.configs, done,
                                                                strict=True))
        elapsed = self.clock() - self.started
        head = (f"grid: {runs}/{len(self.configs)} runs, {sum(done)}/{total} edits, "
                f"{minutes(elapsed)} spent")
        if work_left == 0:
            return head + ", done"
        if work_done > 0:
            return head + f", about {minutes(elapsed * work_left / work_done)} left"
        return head + (f", about {minutes(work_left / self.jobs)} left (CPU estimate from the "
                       f"measured seconds per edit)")
