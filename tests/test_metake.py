"""MetaKE on a tiny random model: the proxy is the real single-layer write, its gradient is
the structural hypergradient, and the outer loop lowers the loss the solver will realise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.scoring import mean_nll
from methods import get_method
from methods.alignment import proxy_hypergradient
from methods.base import hparams_from_dict
from methods.metake import virtual_write
from tests.test_methods import SMALL, _restore, _snapshot

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"]
TARGETS = ["English", "Italy"]


def test_virtual_write_equals_real_write(tiny_lm):
    w = tiny_lm.rewrite_weight(1)
    torch.manual_seed(0)
    delta = 0.05 * torch.randn_like(w)
    with virtual_write(tiny_lm, 1, delta):
        virtual = mean_nll(tiny_lm, PROMPTS, TARGETS)
    snap = _snapshot(tiny_lm, [1])
    try:
        tiny_lm.apply_delta(1, delta)
        real = mean_nll(tiny_lm, PROMPTS, TARGETS)
    finally:
        _restore(tiny_lm, snap)
    torch.testing.assert_close(virtual, real, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(real, mean_nll(tiny_lm, PROMPTS, TARGETS), atol=1e-4)


def test_gradient_through_hook_is_the_structural_hypergradient(tiny_lm):
    """d/dV of L((V - Z0) A) + gamma |V - V0|^2 equals (dL/dDelta) A^T + 2 gamma (V - V0)."""
    torch.manual_seed(1)
    d_out, d_in = tiny_lm.rewrite_weight(1).shape
    n, gamma = 2, 0.3
    A = 0.1 * torch.randn(n, d_in, dtype=torch.float64)
    Z0 = torch.randn(d_out, n, dtype=torch.float64)
    V0 = Z0 + 0.1 * torch.randn(d_out, n, dtype=torch.float64)
    V = (V0 + 0.05 * torch.randn(d_out, n, dtype=torch.float64)).requires_grad_(True)
    with torch.enable_grad():
        with virtual_write(tiny_lm, 1, (V - Z0) @ A):
            loss = mean_nll(tiny_lm, PROMPTS, TARGETS).sum()
        loss = loss + gamma * ((V - V0) ** 2).sum()
        (g_v,) = torch.autograd.grad(loss, V)
        delta = ((V - Z0) @ A).detach().requires_grad_(True)
        with virtual_write(tiny_lm, 1, delta):
            (g_delta,) = torch.autograd.grad(mean_nll(tiny_lm, PROMPTS, TARGETS).sum(), delta)
    expected = proxy_hypergradient(g_delta, A, V.detach(), V0, gamma)
    torch.testing.assert_close(g_v, expected, atol=1e-7, rtol=1e-5)


@pytest.fixture
def corpus(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    return str(shared_data / "wikitext-2" / "valid.txt")


@pytest.mark.parametrize("name", ["metake", "metake-noproxy", "alphaedit-rescaled"])
def test_variants_run_and_record_diagnostics(tiny_lm, corpus, shared_data, name):
    from suites.counterfact import load

    reqs = load(shared_data / "counterfact" / "counterfact-edit.json")[:2]
    mod = get_method(name)
    hp = hparams_from_dict(mod.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus,
                                         "outer_steps": 4, "outer_clamp_factor": 200.0,
                                         "gamma": 0.0, "outer_lr": 1.0})
    snap = _snapshot(tiny_lm, range(tiny_lm.n_layers))
    try:
        out = mod.edit(tiny_lm, reqs, hp, {})
    finally:
        _restore(tiny_lm, snap)
    assert set(out.state) == {"prev_cov.1", "prev_cov.2"}
    for d in out.diagnostics:
        assert d["rho"] == d["rho"] and d["rho_pred_open_loop"] == d["rho_pred_open_loop"]
        if name == "metake":
            assert d["proxy_nll_final"] < d["proxy_nll_open_loop"]
            for key in ("alignment", "kernel_energy", "alignment_open_loop",
                        "kernel_energy_open_loop", "shift_cos", "shift_norm"):
                assert key in d
        if name == "alphaedit-rescaled":
            assert d["rescale"] >= 1.0


def test_bad_solver_is_rejected():
    from harness.errors import UserError
    from methods import metake

    with pytest.raises(UserError, match="solver must be one of"):
        hparams_from_dict(metake.Hparams, {"solver": "prune"})


def test_metake_over_emmet_learns_targets_through_emmets_solver(tiny_lm, corpus, shared_data,
                                                                restore):
    """MetaKE with EMMET as its lower level: the proxy's A is EMMET's (equality constraints on
    the keys), the write is EMMET's, and the learned targets lower the proxy loss."""
    from methods import emmet, metake
    from methods.locate import layer_statistics
    from suites.counterfact import load

    reqs = load(shared_data / "counterfact" / "counterfact-edit.json")[:3]
    hp = hparams_from_dict(metake.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus,
                                            "solver": "emmet", "mom2_update_weight": 1.0,
                                            "outer_steps": 4, "outer_clamp_factor": 200.0,
                                            "gamma": 0.0, "outer_lr": 1.0})
    C0, _, _ = layer_statistics(tiny_lm, hp, [2])
    K = torch.randn(C0[2].shape[0], 3, dtype=torch.float64)
    A = metake.proxy_A(tiny_lm, hp, 2, K, {}, {})
    # EMMET writes every edit exactly on its key (up to the ridge mu_e): A K ~ I
    assert torch.allclose(A @ K, torch.eye(3, dtype=torch.float64), atol=0.2)
    eh = hparams_from_dict(emmet.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus,
                                           "mom2_update_weight": 1.0})
    ridge_free = metake.emmet_A(K, emmet.preservation_matrix(C0[2].double(), eh), 0.0)
    assert torch.allclose(ridge_free @ K, torch.eye(3, dtype=torch.float64), atol=1e-6)
    out = metake.edit(tiny_lm, reqs, hp, {})
    assert not out.state  # EMMET carries no solver state
    for d in out.diagnostics:
        assert d["proxy_nll_final"] < d["proxy_nll_open_loop"]
        assert np.isfinite(d["rho"])


@pytest.mark.parametrize("name", ["metake", "metake-noproxy"])
def test_metake_over_blue_refines_each_boundary_layers_own_target(tiny_lm, corpus,
                                                                   shared_data, restore, name,
                                                                   monkeypatch):
    """write_plan blue: every boundary layer's target is refined at that layer (the proxy's
    virtual write sits there; its own proxy diagnostics, the first layer's under the prefix
    ``layer1_``), written before the next layer's target step, and AlphaEdit's keys of both
    layers are carried to the next batch."""
    from methods import metake
    from suites.counterfact import load

    proxy_layers = []
    real_virtual_write = metake.virtual_write

    def spy(lm, layer, delta):
        proxy_layers.append(layer)
        return real_virtual_write(lm, layer, delta)

    monkeypatch.setattr(metake, "virtual_write", spy)

    reqs = load(shared_data / "counterfact" / "counterfact-edit.json")[:2]
    mod = get_method(name)
    hp = hparams_from_dict(mod.Hparams, {**SMALL, "layers": [1, 3], "stats_corpus": corpus,
                                         "write_plan": "blue", "outer_steps": 4,
                                         "outer_clamp_factor": 200.0, "gamma": 0.0,
                                         "outer_lr": 1.0})
    out = mod.edit(tiny_lm, reqs, hp, {})
    assert set(out.state) == {"prev_cov.1", "prev_cov.3"}
    assert out.timings["refine_s"] > 0
    assert sorted(set(proxy_layers)) == ([1, 3] if name == "metake" else [])
    for d in out.diagnostics:
        for prefix in ("layer1_", ""):
            assert np.isfinite(d[f"{prefix}proxy_nll_open_loop"])
            if name == "metake":
                assert d[f"{prefix}proxy_nll_final"] < d[f"{prefix}proxy_nll_open_loop"]
                assert f"{prefix}alignment" in d
        assert np.isfinite(d["rho"])


def test_blue_write_plan_is_validated_and_names_its_arm():
    from harness.errors import UserError
    from methods import metake
    from reports.load import arm_of

    with pytest.raises(UserError, match="write_plan must be one of"):
        hparams_from_dict(metake.Hparams, {"write_plan": "boundary"})
    with pytest.raises(UserError, match="write_plan blue needs"):
        hparams_from_dict(metake.Hparams, {"write_plan": "blue", "solver": "rome",
                                           "layers": [5]})
    manifest = {"method": "metake", "hparams": {"solver": "memit", "write_plan": "blue"}}
    assert arm_of(manifest) == "metake-memit-blue"
    assert arm_of({"method": "metake", "hparams": {"write_plan": "blue"}}) == "metake-blue"
    assert arm_of({"method": "metake-noproxy", "hparams": {"write_plan": "spread"}}) == \
        "metake-noproxy"


def test_a_request_with_nothing_left_to_write_has_undefined_ratios_not_a_failure(
        tiny_lm, corpus, shared_data, restore):
    """Under BLUE a request whose first boundary write already reached its target comes to the
    next layer with V0 = Z0. Its open-loop rho is 0/0: recorded as None (undefined), which the
    loop's finiteness check accepts, while the other requests keep their numbers."""
    from harness.loop import _finite
    from methods import metake
    from methods.locate import projectors, templates_for
    from methods.targets import compute_targets
    from suites.counterfact import load

    reqs = load(shared_data / "counterfact" / "counterfact-edit.json")[:2]
    hp = hparams_from_dict(metake.Hparams, {**SMALL, "layers": [1, 3], "stats_corpus": corpus,
                                            "write_plan": "blue", "outer_steps": 2})
    templates = templates_for(tiny_lm, hp)
    Z0, V, _, problem = compute_targets(tiny_lm, reqs, 3, hp, templates)
    V[:, 0] = Z0[:, 0]
    _, info = metake.refine(tiny_lm, reqs, hp, Z0, V, problem, templates,
                            projectors(tiny_lm, hp, [3]), {}, at=3)
    assert info[0]["rho_pred_open_loop"] is None
    assert np.isfinite(info[1]["rho_pred_open_loop"]) and np.isfinite(info[1]["rho_pred"])
    assert _finite(info)
    # a NaN that is not 0/0 stays a NaN (and fails the batch)
    got = metake._defined(torch.tensor([0.5, float("nan"), float("nan")]),
                          torch.tensor([[1.0, 0.0, 2.0]]))
    assert got[0] == 0.5 and got[1] is None and np.isnan(got[2])
