"""The grid's overall progress line (runs done, edits done, time spent, an ETA) and the split
of a grid between ``--jobs`` workers.

Both weigh a run by what it is expected to cost: its edits times the method's seconds per
edit plus its evaluation. The costs are measurements (SmolLM2-135M, CounterFact, batch size
1, batch mode, one thread, greedy answers off; CPU seconds, 2026-12-06, on a 2-core AVX2 EPYC
shared with other jobs): noop 0.9 s per case (evaluation only), MEMIT 9.7, AlphaEdit 13.1,
MetaKE 16.7 s per edit with its evaluation. The other methods are scaled from the 100-case
table of ``methods/hparams/README.md`` by AlphaEdit's ratio. Larger batches cost less per
edit (AlphaEdit: 7.8 s at batch 10), which the ETA absorbs: until a tenth of this session's
work is done the table gives the estimate (labelled a CPU estimate); after, the time actually
spent on the work done so far scales it to this machine. Runs found complete are not counted
as work done in this session.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness import records as rec_io
from harness.checkpoint import CHECKPOINT_DIR, PROGRESS
from harness.config import RunConfig

#: evaluation per case (teacher-forced; greedy answers and fluency texts add more)
EVAL_SECONDS_PER_CASE = 0.9
_MEASURED = {"noop": 0.0, "memit": 8.8, "alphaedit": 12.2, "metake": 15.8,
             "rome": 17.8}  # ROME: 18.7 s per edit measured, less the evaluation
#: the 100-case table's seconds per edit (sequential batches of 10, another machine)
_TABLE = {"ft": 2.0, "rome": 16.7, "r-rome": 11.7, "prune": 11.9, "rect": 5.8,
          "memit-blue": 11.5, "emmet": 5.6, "alphaedit-blue": 10.0, "alphaedit-rescaled": 5.4,
          "metake-noproxy": 8.5}
#: seconds per edit without its evaluation (module docstring)
SECONDS_PER_EDIT = {**{m: round(v * _MEASURED["alphaedit"] / 5.8, 1) for m, v in _TABLE.items()},
                    **_MEASURED}
#: methods in neither table
DEFAULT_SECONDS_PER_EDIT = _MEASURED["metake"]
#: a run's fixed part (loading the model and its caches, the unedited reference): 7-12 s
FIXED_RUN_SECONDS = 10.0
#: share of this session's work that must be done before its own rate replaces the table's
#: (a sequential run reports its edits a batch at a time, and the first minutes of a grid
#: go to starting workers: too little to extrapolate from)
TRUST_AFTER = 0.1


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.default_run_id()


def per_edit(cfg: RunConfig) -> float:
    """Expected CPU seconds of one edit of the run with its evaluation (one thread)."""
    return SECONDS_PER_EDIT.get(cfg.method, DEFAULT_SECONDS_PER_EDIT) + EVAL_SECONDS_PER_CASE


def weight(cfg: RunConfig) -> float:
    """Expected CPU seconds of a run (one thread; module docstring)."""
    return FIXED_RUN_SECONDS + cfg.n_edits * per_edit(cfg)


def work_done(cfg: RunConfig, edits: int) -> float:
    """The share of :func:`weight` done once the run started and wrote ``edits`` edits."""
    if edits == 0 and not run_dir(cfg).is_dir():
        return 0.0
    return FIXED_RUN_SECONDS + edits * per_edit(cfg)


def balanced_shard(configs: Sequence[RunConfig], index: int, total: int) -> list[RunConfig]:
    """The runs of worker ``index`` of ``total``: longest expected run first to the worker
    with the least work so far (so two workers of a four-run grid finish together rather than
    one waiting on MetaKE and MEMIT); ties keep the grid's order. Every worker computes the
    same split."""
    load = [0.0] * total
    mine = []
    for i in sorted(range(len(configs)), key=lambda i: (-weight(configs[i]), i)):
        w = min(range(total), key=lambda k: (load[k], k))
        load[w] += weight(configs[i])
        if w == index:
            mine.append(i)
    return [configs[i] for i in sorted(mine)]


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
    """Progress of ``configs`` since this object was made (``jobs`` runs at a time); the rate
    behind the ETA counts from :meth:`runs_begin` (after the caches are filled)."""

    def __init__(self, configs: Sequence[RunConfig], jobs: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.configs, self.jobs, self.clock = list(configs), max(1, jobs), clock
        self.started = self.begun = clock()
        self.before = [work_done(c, edits_done(c)) for c in self.configs]

    def runs_begin(self) -> None:
        """The runs start now: the time before (filling the caches) is not theirs."""
        self.begun = self.clock()

    def line(self) -> str:
        done = [edits_done(c) for c in self.configs]
        runs = sum(_status(run_dir(c)) == "complete" for c in self.configs)
        total = sum(c.n_edits for c in self.configs)
        work = [work_done(c, d) for c, d in zip(self.configs, done, strict=True)]
        new = sum(w - b for w, b in zip(work, self.before, strict=True))
        left = sum(weight(c) - w for c, w in zip(self.configs, work, strict=True))
        now = self.clock()
        head = (f"grid: {runs}/{len(self.configs)} runs, {sum(done)}/{total} edits, "
                f"{minutes(now - self.started)} spent")
        if runs == len(self.configs):
            return head + ", done"
        if new > 0 and new >= TRUST_AFTER * (new + left) and now > self.begun:
            return head + f", about {minutes((now - self.begun) * left / new)} left"
        return head + (f", about {minutes(left / self.jobs)} left (CPU estimate from the "
                       f"measured seconds per edit)")
