"""PRUNE, RECT, EMMET, MEMIT-BLUE and AlphaEdit-BLUE: their maths on random float64 matrices
against the closed forms / a direct solve, and each one run sequentially (2 batches) through
the harness runner on a tiny random model, changing only its layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.config import RunConfig
from harness.runner import run
from methods import get_method, memit
from methods.base import hparams_from_dict
from methods.regularizers import (
    prune_restrain,
    rect_sparsify,
    restrain_singular_values,
    top_k_relative_mask,
)
from methods.solvers import emmet_A, spread_residual
from suites.counterfact import load

# the random model has tiny hidden states (|z0| ~ 0.25): free the target from clamp and decay
SMALL = dict(stats_tokens=4000, stats_seq_len=64, v_steps=8, n_context=2, context_length=4,
             clamp_norm_factor=200.0, v_weight_decay=0.0, v_lr=0.5)


def _orth(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


# ------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [math.e, 1.2, 2.0])
def test_prune_restrains_exactly_the_singular_values_above_the_bound(alpha):
    rng = np.random.default_rng(0)
    d_out, d_in, r = 20, 12, 8
    W0 = torch.from_numpy(rng.standard_normal((d_out, d_in)))
    bound = float(np.linalg.svd(W0.numpy(), compute_uv=False)[0])
    s = np.array([9.0, 4.0, 2.5, 1.5, 0.99, 0.5, 0.2, 0.05]) * bound  # 4 above, 4 below
    U, V = _orth(rng, d_out, r), _orth(rng, d_in, r)
    delta = torch.from_numpy(U @ np.diag(s) @ V.T)
    out, n = restrain_singular_values(delta, bound, alpha)
    assert n == 4
    F = np.array([math.log(x, alpha) - math.log(bound, alpha) + bound if x >= bound else x
                  for x in s])
    assert np.allclose(out.numpy(), U @ np.diag(F) @ V.T, atol=1e-10)  # same vectors, F(s)
    got = np.linalg.svd(out.numpy(), compute_uv=False)[:r]
    assert np.allclose(np.sort(got)[::-1], np.sort(F)[::-1], rtol=1e-10)
    assert (F[:4] < s[:4]).all() and (F[:4] >= bound).all()
    # the part of the edit below the bound is untouched
    assert np.allclose(U[:, 4:].T @ out.numpy() @ V[:, 4:], np.diag(s[4:]), atol=1e-10)
    # the restraint is continuous at the bound and increasing above it
    x = torch.tensor([bound * (1 - 1e-12), bound, 2 * bound, 3 * bound], dtype=torch.float64)
    y = prune_restrain(x, bound, alpha)
    assert abs(float(y[1]) - bound) < 1e-9 and bool((y[2:] > y[1:3]).all())


def test_prune_leaves_a_small_edit_unchanged():
    rng = np.random.default_rng(1)
    delta = torch.from_numpy(rng.standard_normal((9, 7)))
    bound = float(torch.linalg.matrix_norm(delta, ord=2)) * 1.01
    out, n = restrain_singular_values(delta, bound)
    assert n == 0 and torch.equal(out, delta)


@pytest.mark.parametrize("keep", [0.4, 0.2, 1.0, 0.013])
def test_rect_keeps_exactly_the_top_k_relative_changes(keep):
    rng = np.random.default_rng(2)
    W = torch.from_numpy(rng.standard_normal((30, 20)))
    delta = torch.from_numpy(rng.standard_normal((30, 20)) * 1e-2)
    mask = top_k_relative_mask(delta, W, keep)
    n_keep = math.ceil(keep * W.numel())
    assert int(mask.sum()) == n_keep
    rel = np.abs(delta.numpy() / (W.numpy() + 1e-8)).reshape(-1)
    order = np.argsort(-rel, kind="stable")
    expect = np.zeros(rel.size, dtype=bool)
    expect[order[:n_keep]] = True
    assert (mask.numpy().reshape(-1) == expect).all()
    out = rect_sparsify(delta, W, keep)
    assert torch.equal(out[mask], delta[mask]) and bool((out[~mask] == 0).all())


@pytest.mark.parametrize("lam,mu", [(1.0, 0.0), (1000.0, 0.0), (15000.0, 0.3)])
def test_emmet_meets_the_equality_constraints_like_a_direct_kkt_solve(lam, mu):
    rng = np.random.default_rng(3)
    d_out, d_in, n = 7, 12, 4
    X = rng.standard_normal((d_in, 3 * d_in))
    C0 = X @ X.T / X.shape[1]
    C = lam * C0 + mu * np.eye(d_in)
    K = rng.standard_normal((d_in, n))
    R = rng.standard_normal((d_out, n))
    delta = torch.from_numpy(R) @ emmet_A(torch.from_numpy(K), torch.from_numpy(C), 0.0)
    assert np.allclose(delta.numpy() @ K, R, atol=1e-10)  # every edit realised exactly
    # KKT of min_Delta tr(Delta C Delta^T) s.t. Delta K = R, one row of Delta at a time:
    # [2C K; K^T 0] [delta_row; mu_row] = [0; r_row]
    kkt = np.block([[2 * C, K], [K.T, np.zeros((n, n))]])
    rhs = np.vstack([np.zeros((d_in, d_out)), R.T])
    direct = np.linalg.solve(kkt, rhs)[:d_in].T
    assert np.allclose(delta.numpy(), direct, atol=1e-9)
    # the ridge version against its closed form (K^T C^-1 K + rho I)^-1 K^T C^-1
    rho = 0.1
    Ci = np.linalg.inv(C)
    closed = R @ np.linalg.inv(K.T @ Ci @ K + rho * np.eye(n)) @ K.T @ Ci
    got = torch.from_numpy(R) @ emmet_A(torch.from_numpy(K), torch.from_numpy(C), rho)
    assert np.allclose(got.numpy(), closed, atol=1e-9)


def test_emmet_preservation_matrix_and_ridge_only_for_batches():
    mod = get_method("emmet")
    hp = hparams_from_dict(mod.Hparams, {"mom2_update_weight": 3.0, "update_norm_lambda": 0.5})
    C0 = torch.eye(4, dtype=torch.float64) * 2
    assert torch.allclose(mod.preservation_matrix(C0, hp), torch.eye(4, dtype=torch.float64) * 6.5)


def test_blue_plan_is_direct_full_residuals_at_the_boundary_layers():
    from methods.memit_blue import residual_plan

    assert residual_plan([4, 8]) == [(4, 4, 1.0), (8, 8, 1.0)]
    # MEMIT, for contrast: every layer solves for a share of the last layer's residual
    R = torch.ones(3, 2, dtype=torch.float64)
    assert [float(spread_residual(R, i, 5)[0, 0]) for i in range(5)] == [0.2, 0.25,
                                                                       1 / 3, 0.5, 1.0]


# ------------------------------------------------------------------------------------------
# tiny model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def requests_(shared_data):
    return load(shared_data / "counterfact" / "counterfact-edit.json")[:4]


def _snapshot(lm, layers):
    return {layer: lm.rewrite_weight(layer).clone() for layer in layers}


def _restore(lm, snap):
    with torch.no_grad():
        for layer, w in snap.items():
            lm.rewrite_weight(layer).copy_(w)


def test_blue_writes_the_first_layer_with_its_own_full_residual(tiny_lm, corpus, requests_):
    from methods.keys import averaged_keys
    from methods.locate import layer_statistics, templates_for
    from methods.memit_blue import edit_blue
    from methods.solvers import memit_A
    from methods.targets import compute_targets

    mod = get_method("memit-blue")
    hp = hparams_from_dict(mod.Hparams, {**SMALL, "layers": [1, 3], "stats_corpus": corpus})
    reqs = requests_[:2]
    snap = _snapshot(tiny_lm, range(tiny_lm.n_layers))
    try:
        templates = templates_for(tiny_lm, hp)
        _, V1, _, _ = compute_targets(tiny_lm, reqs, 1, hp, templates)  # unedited model
        K, Z = averaged_keys(tiny_lm, reqs, templates, [1], [1], hp.key_averaging,
                             hp.value_site)
        C0, _, _ = layer_statistics(tiny_lm, hp, [1])
        R1 = (V1 - Z[1]).double()
        expect = R1 @ memit_A(K[1].double(), C0[1].double(), hp.mom2_update_weight)
        seen = {}
        base = memit.solver_for(tiny_lm, hp)

        def solver(layer, R, K_, *rest):
            seen[layer] = R.clone()
            return base(layer, R, K_, *rest)

        diags, _, _ = edit_blue(tiny_lm, reqs, hp, solver)
        assert sorted(seen) == [1, 3]
        assert torch.allclose(seen[1], R1, atol=1e-6, rtol=1e-5)  # share 1, not 1/L
        d1 = tiny_lm.rewrite_weight(1).double() - snap[1].double()
        assert torch.allclose(d1, expect, atol=1e-6, rtol=1e-4)
        changed = [i for i in range(tiny_lm.n_layers)
                   if not torch.equal(snap[i], tiny_lm.rewrite_weight(i))]
        assert changed == [1, 3]
        for d in diags:
            assert d["rho"] == d["rho"] and "layer1_target_nll_final" in d
    finally:
        _restore(tiny_lm, snap)


CASES = {
    "prune": {"layers": [1, 2]},
    "rect": {"layers": [1, 2], "rect_keep": 0.4},
    "emmet": {"layers": [1, 2], "mom2_update_weight": 15000.0},
    "memit-blue": {"layers": [1, 3]},
    "alphaedit-blue": {"layers": [1, 3]},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_runs_sequentially_through_the_runner_and_edits_only_its_layers(
        tmp_path, monkeypatch, tiny_lm, corpus, name):
    from methods.regularizers import restrain_singular_values as restrain

    mod = get_method(name)
    layers = CASES[name]["layers"]
    snap = _snapshot(tiny_lm, range(tiny_lm.n_layers))
    calls: list[dict] = []
    original_edit = mod.edit

    def spy(lm, requests, hparams, state):
        before = _snapshot(lm, range(lm.n_layers))
        out = original_edit(lm, requests, hparams, state)
        changed = [i for i in range(lm.n_layers)
                   if not torch.equal(before[i], lm.rewrite_weight(i))]
        ever = [i for i in range(lm.n_layers) if not torch.equal(snap[i], lm.rewrite_weight(i))]
        calls.append({"changed": changed, "ever": ever, "state": dict(out.state)})
        if name == "prune":  # the evaluated weights are W0 + F(unrestrained accumulated edit)
            for layer in layers:
                W0, bound = lm.info["_prune_w0"][layer]
                raw = out.state[f"prune_raw.{layer}"].double()
                want = W0.double() + restrain(raw, bound, hparams.prune_alpha)[0]
                assert torch.allclose(lm.rewrite_weight(layer).double(), want, atol=1e-6)
        return out

    monkeypatch.setattr(mod, "edit", spy)
    cfg = RunConfig(model="random:llama-tiny", method=name, suite="counterfact", n_edits=4,
                    batch_size=2, sequential=True, device="cpu", out_dir=str(tmp_path),
                    hparams_overrides={**SMALL, **CASES[name], "stats_corpus": corpus})
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["n_failed"] == 0
    assert len(calls) == 2
    for c in calls:
        assert c["ever"] == layers
        assert set(c["changed"]) <= set(layers) and c["changed"]
    if name == "alphaedit-blue":
        assert set(calls[1]["state"]) == {f"prev_cov.{layer}" for layer in layers}
    if name == "prune":
        assert set(calls[1]["state"]) == {f"prune_raw.{layer}" for layer in layers}
    for i in range(tiny_lm.n_layers):  # the runner hands the model back unedited
        assert torch.equal(snap[i], tiny_lm.rewrite_weight(i))


def test_blue_diagnostics_stay_finite_when_the_last_layer_has_nothing_left(
        tiny_lm, corpus, requests_, monkeypatch):
    """Once the first layer's write reaches the target, the last layer's target step stops
    at once (V = Z0 there); rho must then describe the batch, not 0/0."""
    import methods.memit_blue as blue

    hp = hparams_from_dict(blue.Hparams, {**SMALL, "layers": [1, 3], "stats_corpus": corpus})
    real = blue.compute_targets

    def targets(lm, reqs, layer, hp_, templates):
        Z0, V, info, problem = real(lm, reqs, layer, hp_, templates)
        return (Z0, Z0.clone(), info, problem) if layer == 3 else (Z0, V, info, problem)

    monkeypatch.setattr(blue, "compute_targets", targets)
    snap = _snapshot(tiny_lm, range(tiny_lm.n_layers))
    try:
        diags, _, _ = blue.edit_blue(tiny_lm, requests_[:2], hp,
                                     memit.solver_for(tiny_lm, hp))
        for d in diags:
            assert math.isfinite(d["rho"]) and math.isfinite(d["z_error"])
            assert d["residual_norm"] > 0
        assert torch.equal(snap[3], tiny_lm.rewrite_weight(3))  # nothing left to write
        assert not torch.equal(snap[1], tiny_lm.rewrite_weight(1))
    finally:
        _restore(tiny_lm, snap)
