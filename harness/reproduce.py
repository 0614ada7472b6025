"""The reproduction verdicts of ``--grid reproduce``: is each number of the faithful preset
inside the 95% Wilson interval of the original code's number on the same 100 cases?

The original code's numbers: the AlphaEdit repository's ROME, MEMIT and AlphaEdit code (its
``experiments/evaluate.py`` loop with the published Llama-3-8B hyperparameter files) run on
SmolLM2-135M-Instruct, CounterFact cases 0-99 of the KnowEdit split, sequential batches of 10,
seed 0, before 2026-12-03 (``methods/hparams/README.md`` tells how the harness got there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from scipy.stats import binomtest

from harness import records as rec_io

#: grid name whose runs are checked against :data:`ORIGINAL`
GRID = "reproduce"
#: method -> ES / PS / NS (%) of the original code on the 100 cases
ORIGINAL = {"alphaedit": (77, 63, 64), "memit": (49, 42, 65), "rome": (72, 65, 51)}
N_CASES = 100
COLUMNS = (("ES", "efficacy_success"), ("PS", "paraphrase_success"),
           ("NS", "neighborhood_success"))
#: the design of the original's numbers: a run of another design gets no verdict
DESIGN = {"model": "smollm2-135m", "suite": "counterfact", "n_edits": N_CASES, "start": 0,
          "batch_size": 10, "sequential": True, "seed": 0, "preset": "faithful"}


def off_design(config: dict) -> list[str]:
    """How a run's config differs from :data:`DESIGN` (``key value, not expected``)."""
    return [f"{k} {config.get(k)!r}, not {v!r}" for k, v in DESIGN.items()
            if config.get(k) != v]


def wilson(percent: float, n: int = N_CASES) -> tuple[float, float]:
    """95% Wilson interval (in %) of a proportion of ``percent`` % of ``n`` cases."""
    ci = binomtest(round(percent * n / 100), n).proportion_ci(0.95, method="wilson")
    return 100 * ci.low, 100 * ci.high


def verdict_lines(run_dirs: Iterable[Path]) -> list[str]:
    """A Markdown table: per method, keh's ES / PS / NS beside the original's number and
    interval, and whether each is inside."""
    lines = ["Reproduction: keh --preset faithful against the original code on CounterFact "
             "cases 0-99 (SmolLM2-135M, sequential batches of 10, seed 0); inside = within "
             "the 95% Wilson interval of the original's number (a band for the sampling error "
             "of 100 cases, not a paired test).", "",
             "| method | " + " | ".join(f"{k}: keh / original [interval]" for k, _ in COLUMNS)
             + " | verdict |", "|---|---|---|---|---|"]
    for d in run_dirs:
        m = json.loads((Path(d) / rec_io.MANIFEST).read_text(encoding="utf-8"))
        method = m["config"]["method"]
        if method not in ORIGINAL:
            continue
        other = off_design(m["config"])
        if other:
            lines.append(f"| {method} | " + " | ".join("\u2013" for _ in COLUMNS)
                         + f" | no verdict: not the reproduction's design ({'; '.join(other)})"
                           " |")
            continue
        cells, inside = [], 0
        for (_, col), orig in zip(COLUMNS, ORIGINAL[method], strict=True):
            ours = float(m["summary"][col])  # the run summary is in percent
            lo, hi = wilson(orig)
            ok = lo <= ours <= hi
            inside += ok
            cells.append(f"{ours:.0f} / {orig} [{lo:.1f}, {hi:.1f}] "
                         f"{'inside' if ok else 'OUTSIDE'}")
        verdict = ("all three inside" if inside == 3
                   else f"{3 - inside} of 3 outside the original's interval")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {verdict} |")
    return lines
