"""Calibration of the regression gate (``keh compare`` / ``nox -s regress``) at its default
designs, through the whole gate: pairing, units, the margin tests, Holm across the four
default CounterFact metrics and the verdict.

Simulated runs have the record format of real ones and the structure measured on SmolLM2
(AlphaEdit, faithful, CounterFact cases 0-159, ``docs/USAGE.md``): per case a latent
log-probability margin shared by every run (sd 3 nats about a mean of 3.3), per run a case
noise (the paired null difference of two seeds has sd ``MARGIN_SD``), efficacy success iff
the margin is positive; paraphrase and neighbourhood margins likewise, with their own
case effects; per batch a shock shared by its cases (they share one weight update). Two
designs, the protocols of :mod:`harness.regress`:

* ``batch``: 160 cases in independent batches of 10 (16 units), one seed a side;
* ``sequential``: 160 cases in 16 accumulating batches, with batch shocks three times as
  large (every case is scored on the final model).

Asserted at alpha 0.05 (Holm over the four metrics):
(a) a method against itself with another seed (run noise, no true difference): "worse"
    (exit 1) in at most 0.08 of 200 null comparisons per design;
(b) a planted regression of the stated size (:data:`PLANTED`, one metric at a time): that
    metric "worse" in at least 80% of 100 comparisons, and the stated size is within 1.5x
    of the MDE the gate prints (it is near the limit of the design, not far above it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from harness.regress import PROTOCOLS
from reports.compare import compare_runs, exit_status
from reports.load import combine, run_frame

MARGIN_SD = 1.0  # sd of the paired difference of two seeds' margins (measured 0.87)
ALPHA, N_NULL, N_POWER = 0.05, 200, 100
METRICS = ("efficacy_success", "paraphrase_success", "neighborhood_success",
           "efficacy_margin")


@dataclass(frozen=True)
class Design:
    name: str
    n_cases: int
    batch_size: int
    sequential: bool
    batch_sd: float  # shock shared by a batch's cases, nats


DESIGNS = {name: Design(name, p.n_edits, p.batch_size, p.sequential,
                        0.3 if not p.sequential else 0.9)
           for name, p in PROTOCOLS.items()}

#: planted regressions per design (metric -> drop): rates as fractions, the margin in nats;
#: each is produced by lowering the candidate's margins on a share of the cases
PLANTED = {
    "batch": {"efficacy_success": 0.15, "paraphrase_success": 0.15,
              "neighborhood_success": 0.15, "efficacy_margin": 1.0},
    "sequential": {"efficacy_success": 0.2, "efficacy_margin": 1.5},
}


def _manifest(rid: str, method: str, seed: int, d: Design, hparams: dict) -> dict:
    return {"run_id": rid, "status": "complete", "method": method, "seed": seed,
            "config": {"model": "sim", "suite": "counterfact", "batch_size": d.batch_size,
                       "sequential": d.sequential, "seed": seed, "n_edits": d.n_cases,
                       "preset": "faithful"},
            "hparams": hparams,
            "data": {"sha256": "d" * 64, "n_cases": d.n_cases,
                     "case_ids": [str(i) for i in range(d.n_cases)]},
            "model": {"name": "sim", "sha256": "m" * 64}}


def simulate(d: Design, rng: np.random.Generator, drop: dict[str, float] | None = None):
    """(baseline Runs, candidate Runs): seed 0 against seed 1 of the same method, the
    candidate lowered by ``drop`` (metric -> size)."""
    n = d.n_cases
    batch = np.arange(n) // d.batch_size
    latent = {k: rng.normal(mu, 3.0, n) for k, mu in
              (("efficacy", 3.3), ("paraphrase", 1.5), ("neighborhood", 1.5))}
    sides = []
    for side, seed in (("base", 0), ("cand", 1)):
        shock = rng.normal(0, d.batch_sd, batch.max() + 1)[batch]
        m = {k: v + shock + rng.normal(0, MARGIN_SD / math.sqrt(2), n)
             for k, v in latent.items()}
        if side == "cand" and drop:
            for metric, size in drop.items():
                key = metric.split("_")[0]
                if metric == "efficacy_margin":
                    m["efficacy"] = m["efficacy"] - size
                    continue
                # a share of the cases that succeed flips to failure: a drop of `size`
                ok = np.flatnonzero(m[key] > 0)
                hit = rng.choice(ok, size=min(ok.size, round(size * n)), replace=False)
                m[key][hit] = -rng.uniform(0.1, 2.0, hit.size)
        recs = [{"case_id": str(i), "case_index": i, "batch": int(batch[i]),
                 "efficacy_success": float(m["efficacy"][i] > 0),
                 "paraphrase_success": float(m["paraphrase"][i] > 0),
                 "neighborhood_success": float(m["neighborhood"][i] > 0),
                 "efficacy_margin": float(m["efficacy"][i])} for i in range(n)]
        mf = _manifest(f"{side}_s{seed}", "alphaedit", seed, d,
                       {"layers": [4]} if side == "base" else {"layers": [4], "v": 1})
        sides.append(combine([run_frame(mf, recs)], {mf["run_id"]: mf}))
    return sides


def _gate(base, cand):
    c = compare_runs(base, cand, alpha=ALPHA, n_draws=999)
    return c, exit_status(c)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_the_gate_says_worse_at_most_alpha_for_a_method_against_itself(design):
    d = DESIGNS[design]
    rng = np.random.default_rng(100)
    worse = sum(_gate(*simulate(d, rng))[1] == 1 for _ in range(N_NULL))
    print(f"\n{design}: false 'worse' {worse}/{N_NULL}")
    assert worse / N_NULL <= 0.08


@pytest.mark.parametrize("design", list(DESIGNS))
def test_the_gate_catches_the_stated_regressions(design):
    d = DESIGNS[design]
    rng = np.random.default_rng(200)
    rows = []
    for metric, size in PLANTED[design].items():
        hits, mdes = 0, []
        for _ in range(N_POWER):
            c, status = _gate(*simulate(d, rng, {metric: size}))
            r = next(r for r in c.results if r.metric == metric)
            hits += status == 1 and r.verdict == "worse"
            mdes.append(r.mde)
        rows.append({"metric": metric, "drop": size, "power": hits / N_POWER,
                     "median MDE": float(np.median(mdes))})
    table = pd.DataFrame(rows)
    print(f"\n{design}:\n{table.to_string(index=False)}")
    assert (table["power"] >= 0.8).all(), table.to_dict("records")
    assert (table["drop"] <= 1.5 * table["median MDE"]).all(), table.to_dict("records")
