"""UltraEdit, ENCORE, NAMET and NSE (issue 32): their maths on random float64 matrices against
the closed forms / first-order conditions, and each one on a tiny random model: through the
runner (2 sequential batches), and the step that makes it differ from MEMIT."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.config import RunConfig
from harness.errors import UserError
from harness.runner import run
from methods import encore, get_method, memit, metake, namet, nse, ultraedit
from methods.base import hparams_from_dict
from methods.solvers import (
    lifelong_normalize,
    lifelong_stats_update,
    memit_A,
    select_neurons,
    subspace_memit_A,
    ultraedit_A,
    ultraedit_values,
)
from suites.counterfact import load
from tests import test_methods
from tests.test_methods import _snapshot

SMALL = {**test_methods.SMALL, "v_lr": 0.5}


@pytest.fixture(scope="module")
def cf(shared_data):
    """The first 4 CounterFact requests."""
    return load(shared_data / "counterfact" / "counterfact-edit.json")[:4]


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    X = rng.standard_normal((d, 3 * d))
    return X @ X.T / X.shape[1]


# ------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu,with_prev", [(0.0, False), (20.0, False), (20.0, True)])
def test_encore_update_is_the_stationary_point_of_its_objective(mu, with_prev):
    """Delta = R A minimises |Delta K - R|^2 + lam tr(Delta C0 Delta^T) + mu |Delta|^2
    + |Delta K_p|^2: its gradient vanishes there, and it is MEMIT's update when mu = 0 and
    no earlier keys are kept."""
    rng = np.random.default_rng(0)
    d_out, d_in, n, m, lam = 6, 10, 3, 4, 3.0
    C0, K, R = _spd(rng, d_in), rng.standard_normal((d_in, n)), rng.standard_normal((d_out, n))
    Kp = rng.standard_normal((d_in, m))
    prev = torch.from_numpy(Kp @ Kp.T) if with_prev else None
    A = encore.encore_A(torch.from_numpy(K), torch.from_numpy(C0), lam, mu, prev)
    D = R @ A.numpy()
    P = Kp @ Kp.T if with_prev else np.zeros((d_in, d_in))
    grad = 2 * (D @ K - R) @ K.T + 2 * lam * D @ C0 + 2 * mu * D + 2 * D @ P
    assert np.abs(grad).max() < 1e-10
    memit_D = R @ memit_A(torch.from_numpy(K), torch.from_numpy(C0), lam).numpy()
    assert np.allclose(D, memit_D, atol=1e-12) == (mu == 0.0 and not with_prev)


class _FakeProblem(SimpleNamespace):
    """The fields of a TargetProblem that a stop rule reads: 2 requests x 3 templates; rows
    0-2 request 0 (plain, prefixed, prefixed), 3 its KL row, 4-6 request 1, 7 its KL row."""


def _problem(correct: list[bool]) -> _FakeProblem:
    rows = torch.tensor([0, 1, 1, 2, 4, 5, 6, 6])  # target tokens' rows
    return _FakeProblem(n=2, owner=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                        plain_rows=torch.tensor([0, 4]),
                        last_correct=(rows, torch.tensor(correct)))


def test_mpes_counts_evaluations_with_every_prefixed_token_top1():
    all_on = torch.ones(2, dtype=torch.bool)
    # request 0: only its plain row's token is wrong; request 1: a prefixed token is wrong
    state = [False, True, True, True, True, True, False, True]
    rule = encore.mpes_rule(2, include_plain=False)
    assert rule(_problem(state), all_on).tolist() == [False, False]  # counted once: 1 < 2
    assert rule(_problem(state), all_on).tolist() == [True, False]  # twice: stop request 0
    # the plain prompt counts under "all"; inactive requests are not counted
    rule_all = encore.mpes_rule(1, include_plain=True)
    assert rule_all(_problem(state), all_on).tolist() == [False, False]
    rule1 = encore.mpes_rule(1, include_plain=False)
    ok = [True] * 8
    assert rule1(_problem(ok), torch.tensor([True, False])).tolist() == [True, False]
    assert rule1(_problem(ok), all_on).tolist() == [True, True]


def test_nse_selects_the_neurons_carrying_the_key_mass():
    # scores sum_j |k_j| = [1, 5, 3, 1] (neuron 0 and 3 tie, sorted stably by torch)
    K = torch.tensor([[1.0, 0.0], [2.0, -3.0], [0.0, 3.0], [-0.5, 0.5]], dtype=torch.float64)
    assert select_neurons(K, 0.8).tolist() == [1, 2]  # cumsum 5, 8 <= 8
    assert select_neurons(K, 0.79).tolist() == [1]
    assert sorted(select_neurons(K, 1.0).tolist()) == [0, 1, 2, 3]
    from methods.solvers import NumericalError

    with pytest.raises(NumericalError):
        select_neurons(K, 0.4)  # the largest score alone is half the mass


def test_nse_subspace_update_solves_memit_on_the_selected_columns_only():
    rng = np.random.default_rng(1)
    d_out, d_in, n = 5, 9, 3
    C, K, R = _spd(rng, d_in), rng.standard_normal((d_in, n)), rng.standard_normal((d_out, n))
    S = np.array([7, 2, 4, 0])
    A = subspace_memit_A(torch.from_numpy(K), torch.from_numpy(C), torch.from_numpy(S))
    D = R @ A.numpy()
    outside = np.setdiff1d(np.arange(d_in), S)
    assert (D[:, outside] == 0).all()
    # first-order condition of min over Delta_S of |Delta_S K_S - R|^2 + tr(Delta_S C_SS Delta_S^T)
    DS, KS, CS = D[:, S], K[S], C[np.ix_(S, S)]
    grad = 2 * (DS @ KS - R) @ KS.T + 2 * DS @ CS
    assert np.abs(grad).max() < 1e-10
    full = R @ subspace_memit_A(torch.from_numpy(K), torch.from_numpy(C),
                                torch.arange(d_in)).numpy()
    assert np.allclose(full, R @ memit_A(torch.from_numpy(K), torch.from_numpy(C), 1.0).numpy())


def test_ultraedit_statistics_follow_the_release_formula():
    """Two chunks of rows: n, mean exact; var accumulates m * unbiased variance per chunk plus
    the between-chunk term (the release's RunningMeanStd), not the pooled sum of squares."""
    rng = np.random.default_rng(2)
    X1, X2 = rng.standard_normal((4, 3)), rng.standard_normal((6, 3)) + 1.0
    n, mean, var = torch.zeros(1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), \
        torch.zeros(3, dtype=torch.float64)
    for X in (X1, X2):
        n, mean, var = lifelong_stats_update(n, mean, var, torch.from_numpy(X))
    allX = np.vstack([X1, X2])
    assert float(n) == 10 and np.allclose(mean.numpy(), allX.mean(0))
    d = X2.mean(0) - X1.mean(0)
    want = 4 * X1.var(0, ddof=1) + 6 * X2.var(0, ddof=1) + 4 * 6 * d ** 2 / 10
    assert np.allclose(var.numpy(), want)
    pooled = ((allX - allX.mean(0)) ** 2).sum(0)
    assert not np.allclose(var.numpy(), pooled)  # the difference is X1.var + X2.var
    assert np.allclose(var.numpy() - pooled, X1.var(0, ddof=1) + X2.var(0, ddof=1))
    eps = float(np.finfo(np.float32).eps)
    Z = lifelong_normalize(torch.from_numpy(allX), n, mean, var)
    std = np.sqrt(want / (10 - 1 + eps))
    assert np.allclose(Z.numpy(), (allX - allX.mean(0)) / (std + eps))
    # one row: no unbiased variance, no NaN
    n1, _, v1 = lifelong_stats_update(torch.zeros(1), torch.zeros(3), torch.zeros(3),
                                      torch.ones(1, 3))
    assert float(n1) == 1 and bool(torch.isfinite(v1).all())


def test_ultraedit_shift_is_the_ridge_solution_in_both_forms():
    rng = np.random.default_rng(3)
    d_out, d_in, N, lr = 7, 12, 5, 1e-3
    K, Kh, Gh = (rng.standard_normal((d_in, N)), rng.standard_normal((d_in, N)),
                 rng.standard_normal((d_out, N)))
    V = ultraedit_values(torch.from_numpy(Kh), torch.from_numpy(Gh), lr).numpy()
    assert np.allclose(V, -lr * (Kh ** 2).sum(0) * Gh)
    D = V @ ultraedit_A(torch.from_numpy(K)).numpy()
    # the release's (d_in, d_in) form and the ridge objective's first-order condition
    assert np.allclose(D, np.linalg.solve(K @ K.T + np.eye(d_in), K @ V.T).T, atol=1e-12)
    assert np.abs(2 * (D @ K - V) @ K.T + 2 * D).max() < 1e-12


def test_namet_residual_averages_the_prefixed_prompts_only():
    d, T = 3, 4  # templates: plain + 3 prefixed; targets have T + 1 columns (KL last)
    Z = torch.arange(d * (T + 1), dtype=torch.float64).view(d, T + 1)
    H = torch.ones(1, T, d, dtype=torch.float64)
    R = namet.namet_residual([Z], H)
    assert torch.equal(R[:, 0], Z[:, 1:T].mean(1) - 1.0)


# ------------------------------------------------------------------------------------------
# tiny model
# ------------------------------------------------------------------------------------------


CASES = {
    "encore": {**SMALL, "layers": [1, 2]},
    "nse": {**SMALL, "layers": [1, 2], "nse_alpha": 0.0},
    "namet": {**SMALL, "layers": [1, 2], "v_steps": None, "n_context": None,
              "context_length": None, "v_num_grad_steps": 6, "mom2_update_weight": [10.0, 10.0],
              "namet_starters": ["The", "I"], "template_tokens": 3},
    "ultraedit": {"layers": [1, 2], "lr": 1e-3},
    "metake": {**SMALL, "layers": [1, 2], "solver": "encore", "update_norm_lambda": 20.0,
               "outer_steps": 2},
}
STATE = {"encore": "prev_cov", "nse": "prev_cov", "metake": "prev_cov", "namet": None,
         "ultraedit": "ultra"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sequential_run_changes_only_the_listed_rewrite_matrices(
        tmp_path, monkeypatch, tiny_lm, corpus, name):
    """Two sequential batches through the runner: every change is in the rewrite matrices of
    ``layers`` (no other parameter moves), the solver state has the method's keys (grown by
    the second batch), and the runner hands the model back unedited."""
    full = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    snap = _snapshot(tiny_lm, range(tiny_lm.n_layers))
    mod, layers = get_method(name), CASES[name]["layers"]
    calls: list[dict] = []
    original_edit = mod.edit

    def spy(lm, requests, hparams, state):
        out = original_edit(lm, requests, hparams, state)
        ever = [i for i in range(lm.n_layers) if not torch.equal(snap[i], lm.rewrite_weight(i))]
        others = [n for n, p in lm.model.named_parameters()
                  if not torch.equal(full[n], p) and "down_proj" not in n]
        calls.append({"ever": ever, "others": others, "state": dict(out.state)})
        return out

    monkeypatch.setattr(mod, "edit", spy)
    overrides = {k: v for k, v in CASES[name].items() if v is not None}
    if name != "ultraedit":
        overrides["stats_corpus"] = corpus
    cfg = RunConfig(model="random:llama-tiny", method=name, suite="counterfact", n_edits=4,
                    batch_size=2, sequential=True, device="cpu", out_dir=str(tmp_path),
                    hparams_overrides=overrides)
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["n_failed"] == 0
    assert len(calls) == 2
    for c in calls:
        assert c["ever"] == layers and c["others"] == []
    keys = set(calls[1]["state"])
    if STATE[name] == "prev_cov":
        assert keys == {f"prev_cov.{layer}" for layer in layers}
        first = calls[0]["state"][f"prev_cov.{layers[0]}"]
        assert bool((calls[1]["state"][f"prev_cov.{layers[0]}"] != first).any())  # grown
    elif STATE[name] == "ultra":
        d_out, d_in = tiny_lm.rewrite_weight(1).shape
        assert keys == {f"ultra.{d_in}x{d_out}.{k}" for k in ("n", "mean", "var")}
    else:
        assert keys == set()
    for i in range(tiny_lm.n_layers):  # the runner hands the model back unedited
        assert torch.equal(snap[i], tiny_lm.rewrite_weight(i))


def test_encore_second_batch_writes_its_closed_form_with_the_earlier_keys(
        tiny_lm, corpus, cf, restore):
    """The first layer's update of a batch is R/L @ K^T (lam C0 + K_p K_p^T + K K^T)^-1 with
    K_p the first batch's keys from the state (lam 1, mu 0: the earlier keys weigh as much as
    the corpus's); without them (MEMIT's solve) it would differ."""
    from methods.keys import averaged_keys
    from methods.locate import layer_statistics, templates_for
    from methods.targets import compute_targets

    hp = hparams_from_dict(encore.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus,
                                            "mpes_patience": 0, "mom2_update_weight": 1.0,
                                            "update_norm_lambda": 0.0})
    out = encore.edit(tiny_lm, cf[:2], hp, {})
    prev = out.state["prev_cov.1"]
    reqs = cf[2:4]
    templates = templates_for(tiny_lm, hp)
    _, V, _, _ = compute_targets(tiny_lm, reqs, 2, hp, templates)
    K, Z = averaged_keys(tiny_lm, reqs, templates, [1], [2], hp.key_averaging, hp.value_site)
    C0, _, _ = layer_statistics(tiny_lm, hp, [1])
    R = (V - Z[2]).double() / 2
    want = R @ encore.encore_A(K[1].double(), C0[1].double(), 1.0, 0.0, prev.double())
    no_memory = R @ encore.encore_A(K[1].double(), C0[1].double(), 1.0, 0.0, None)
    before = tiny_lm.rewrite_weight(1).double().clone()
    encore.edit(tiny_lm, reqs, hp, out.state)
    got = tiny_lm.rewrite_weight(1).double() - before
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert (got - no_memory).norm() > 0.01 * got.norm()


def test_stop_rule_freezes_a_request_before_its_first_update(tiny_lm, corpus, cf):
    """The target step's stop rule (MPES's hook): a request stopped at the first evaluation
    keeps delta = 0; the other one is optimised as without a rule."""
    from methods.locate import templates_for
    from methods.targets import compute_targets

    hp = hparams_from_dict(encore.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus})
    templates = templates_for(tiny_lm, hp)
    reqs = cf[:2]
    Z0, V, info, _ = compute_targets(tiny_lm, reqs, 2, hp, templates,
                                     stop_rule=lambda p, active: torch.tensor([True, False]))
    _, V_free, info_free, _ = compute_targets(tiny_lm, reqs, 2, hp, templates)
    assert torch.equal(V[:, 0], Z0[:, 0]) and info[0]["target_steps"] == 0
    assert info[1]["target_steps"] == info_free[1]["target_steps"] > 0
    torch.testing.assert_close(V[:, 1], V_free[:, 1])


def test_metake_over_encore_proxies_encores_write(tiny_lm, corpus):
    hp = hparams_from_dict(metake.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus,
                                            "solver": "encore", "update_norm_lambda": 20.0,
                                            "mom2_update_weight": 100.0})
    from methods.locate import layer_statistics

    C0, _, _ = layer_statistics(tiny_lm, hp, [2])
    K = torch.randn(C0[2].shape[0], 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    prev = K @ K.T
    got = metake.proxy_A(tiny_lm, hp, 2, K, {}, {"prev_cov.2": prev})
    want = encore.encore_A(K, C0[2].double(), 100.0, 20.0, prev)
    torch.testing.assert_close(got, want)


def test_nse_values_come_from_the_rewound_weights(tiny_lm, corpus, cf, restore):
    from methods.locate import templates_for
    from methods.targets import compute_targets

    hp = hparams_from_dict(nse.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus})
    templates = templates_for(tiny_lm, hp)
    reqs = cf[:2]
    nse.prepare(tiny_lm, hp)
    _, V_orig, _, _ = compute_targets(tiny_lm, reqs, 2, hp, templates,
                                      target_space=hp.value_target_space)
    torch.manual_seed(0)
    for layer in (1, 2):
        tiny_lm.apply_delta(layer, 0.5 * torch.randn_like(tiny_lm.rewrite_weight(layer)))
    edited = _snapshot(tiny_lm, [1, 2])
    V, _ = nse.rewound_targets(tiny_lm, reqs, hp, templates)
    torch.testing.assert_close(V, V_orig)
    for layer in (1, 2):
        assert torch.equal(tiny_lm.rewrite_weight(layer), edited[layer])
    hp_now = hparams_from_dict(nse.Hparams, {**SMALL, "layers": [1, 2], "stats_corpus": corpus,
                                             "value_rewind": False})
    V_now, _ = nse.rewound_targets(tiny_lm, reqs, hp_now, templates)
    assert not torch.allclose(V_now, V_orig, atol=1e-4)


def test_nse_writes_only_cfwithin_the_bounds_and_only_selected_columns(
        tiny_lm, corpus, cf, restore):
    base = {**SMALL, "layers": [1, 2], "stats_corpus": corpus}
    nse.prepare(tiny_lm, hparams_from_dict(nse.Hparams, base))
    snap = _snapshot(tiny_lm, [1, 2])
    hp = hparams_from_dict(nse.Hparams, {**base, "nse_alpha": 1e6, "nse_upper_bound": 2e6})
    out = nse.edit(tiny_lm, cf[:2], hp, {})
    assert all(torch.equal(snap[i], tiny_lm.rewrite_weight(i)) for i in (1, 2))
    assert [d["nse_rounds"] for d in out.diagnostics] == [0, 0]
    assert set(out.state) == {"prev_cov.1", "prev_cov.2"}  # the keys are kept all the same
    hp = hparams_from_dict(nse.Hparams, {**base, "nse_alpha": 0.0, "neuron_threshold": 0.3,
                                         "nse_max_iterations": 2})
    out = nse.edit(tiny_lm, cf[:2], hp, {})
    assert [d["nse_rounds"] for d in out.diagnostics] == [1, 1]
    changed = (tiny_lm.rewrite_weight(1) != snap[1]).any(0)  # columns = input neurons
    share = out.diagnostics[0]["nse_neuron_share.1"]
    assert 0 < int(changed.sum()) == round(share * changed.numel()) < changed.numel()


def test_ultraedit_keys_and_gradients_and_the_shared_normaliser(tiny_lm, cf, restore):
    """Keys are the rewrite modules' inputs at the answer positions and the gradients those of
    the chunk's mean cross-entropy with respect to their outputs (checked against
    retain_grad); both layers (same shape) feed one normaliser: n = 2 layers x tokens."""
    from harness.scoring import encode_pair, pack, unembed

    reqs = cf[:3]
    names = {layer: tiny_lm.spec.rewrite(layer) for layer in (1, 2)}
    keys, grads, _ = ultraedit.keys_and_grads(tiny_lm, reqs, list(names.values()))
    tok = tiny_lm.tokenizer
    batch = pack(tok, [encode_pair(tok, r.rewrite_prompt, r.target_new) for r in reqs],
                 tiny_lm.device)
    outs, ins = {}, {}
    handles = []
    for layer in (1, 2):
        def hook(_m, args, out, layer=layer):
            out.retain_grad()
            outs[layer], ins[layer] = out, args[0]
        handles.append(tiny_lm.module(tiny_lm.spec.rewrite(layer)).register_forward_hook(hook))
    emb = tiny_lm.model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda _m, _a, o: o.requires_grad_(True)))
    try:
        with torch.enable_grad():
            h = tiny_lm.model.base_model(input_ids=batch.input_ids,
                                         attention_mask=batch.attention_mask).last_hidden_state
            torch.nn.functional.cross_entropy(unembed(tiny_lm, h[batch.rows, batch.cols]),
                                              batch.targets).backward()
    finally:
        for hd in handles:
            hd.remove()
    for layer in (1, 2):
        torch.testing.assert_close(keys[names[layer]],
                                   ins[layer][batch.rows, batch.cols].detach())
        torch.testing.assert_close(grads[names[layer]],
                                   outs[layer].grad[batch.rows, batch.cols])
    hp = hparams_from_dict(ultraedit.Hparams, {"layers": [1, 2], "lr": 1e-3, "chunk_size": 2})
    out = ultraedit.edit(tiny_lm, reqs, hp, {})
    d_out, d_in = tiny_lm.rewrite_weight(1).shape
    n = out.state[f"ultra.{d_in}x{d_out}.n"]
    assert float(n) == 2 * len(batch.targets)
    assert ultraedit.chunks_by_length(tiny_lm, reqs, 2)[0][0] == int(np.argmax(
        [len(p) + len(t) for p, t in (encode_pair(tok, r.rewrite_prompt, r.target_new)
                                      for r in reqs)]))


#: the release's kind of UltraEdit modules (Llama-3, Qwen2.5): a gate and an up projection
GATE_UP = ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"]


def _ultra_cfg(tmp_path, sequential: bool) -> RunConfig:
    return RunConfig(model="random:llama-tiny", method="ultraedit", suite="counterfact",
                     n_edits=4, batch_size=2, sequential=sequential, device="cpu",
                     out_dir=str(tmp_path), run_id="r",
                     hparams_overrides={"layers": [], "edit_modules": GATE_UP, "lr": 1e-3})


@pytest.mark.parametrize("sequential", [True, False])
def test_ultraedit_edits_the_named_gate_and_up_projections(tmp_path, monkeypatch, tiny_lm,
                                                           sequential):
    """With ``edit_modules`` (the release's Llama-3/Qwen2.5 setting) UltraEdit changes those
    modules and nothing else; gate and up (same shape) share one normaliser; batch mode
    starts every batch from the unedited model and the runner hands the model back
    unedited: the loop snapshots and restores named modules, not only rewrite matrices."""
    full = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    calls: list[dict] = []
    original_edit = ultraedit.edit

    def spy(lm, requests, hparams, state):
        fresh = all(torch.equal(full[n], p) for n, p in lm.model.named_parameters())
        out = original_edit(lm, requests, hparams, state)
        moved = sorted(n for n, p in lm.model.named_parameters() if not torch.equal(full[n], p))
        calls.append({"fresh": fresh, "moved": moved, "state": dict(out.state)})
        return out

    monkeypatch.setattr(ultraedit, "edit", spy)
    run_dir = run(_ultra_cfg(tmp_path, sequential), lm=tiny_lm, log=lambda s: None)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["n_failed"] == 0
    assert [c["moved"] for c in calls] == [[f"{m}.weight" for m in GATE_UP]] * 2
    assert [c["fresh"] for c in calls] == [True, not sequential]
    d_in, d_out = tiny_lm.model.config.hidden_size, tiny_lm.model.config.intermediate_size
    key = ultraedit.stats_key(d_in, d_out)
    assert sorted(calls[0]["state"]) == [f"{key}.{s}" for s in ("mean", "n", "var")]
    assert all(torch.equal(full[n], p) for n, p in tiny_lm.model.named_parameters())


def test_ultraedit_named_modules_survive_a_crash_and_resume(tmp_path, monkeypatch, tiny_lm):
    """A sequential run killed while saving batch 2, then resumed, gives the records of an
    uninterrupted run: the checkpoint holds the gate and up weights batch 1 wrote."""
    from harness import checkpoint as ckpt
    from harness.runner import resume
    from tests.test_resume import _Crash, _crash_on_call, _records

    ref = run(_ultra_cfg(tmp_path / "ref", True), lm=tiny_lm, log=lambda s: None)
    with monkeypatch.context() as m:
        _crash_on_call(m, ckpt, "save", 2)
        with pytest.raises(_Crash):
            run(_ultra_cfg(tmp_path / "cut", True), lm=tiny_lm, log=lambda s: None)
    run_dir = tmp_path / "cut" / "r"
    progress = json.loads((run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS).read_text())
    assert progress["batches_done"] == 1
    resume(run_dir, lm=tiny_lm, log=lambda s: None)
    assert _records(run_dir) == _records(ref)


def test_ultraedit_runs_from_before_edit_modules_resume_and_a_short_checkpoint_is_named(
        tmp_path, monkeypatch, tiny_lm):
    """A run whose manifest predates the ``edit_modules`` field (key absent) resumes as the
    same setting (the field's default, ``[]``, is what it ran); a checkpoint that lacks a
    weight the method edits is refused with its name instead of resuming from the live
    weights."""
    from safetensors.torch import load_file, save_file

    from harness import checkpoint as ckpt
    from harness.runner import resume
    from tests.test_resume import _Crash, _crash_on_call

    def cut(name: str, **hp) -> Path:
        cfg = _ultra_cfg(tmp_path / name, True)
        cfg.hparams_overrides.update(hp)
        with monkeypatch.context() as m:
            _crash_on_call(m, ckpt, "save", 2)
            with pytest.raises(_Crash):
                run(cfg, lm=tiny_lm, log=lambda s: None)
        return tmp_path / name / "r"

    old = cut("old", layers=[1, 2], edit_modules=[])
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["hparams"]["edit_modules"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    resume(old, lm=tiny_lm, log=lambda s: None)
    assert json.loads((old / "manifest.json").read_text())["status"] == "complete"

    short = cut("short")
    (tensors,) = (short / ckpt.CHECKPOINT_DIR).glob("tensors-*.safetensors")
    kept = {k: v for k, v in load_file(str(tensors)).items() if "up_proj" not in k}
    save_file(kept, str(tensors))
    with pytest.raises(UserError, match=re.escape("lacks weight.model.layers.2.mlp.up_proj")):
        resume(short, lm=tiny_lm, log=lambda s: None)


def test_ultraedit_names_a_missing_module_in_one_line(tmp_path, tiny_lm):
    from harness.errors import UserError

    cfg = _ultra_cfg(tmp_path, True)
    cfg.hparams_overrides["edit_modules"] = ["model.layers.1.mlp.gate"]
    with pytest.raises(UserError, match=re.escape("has no module 'model.layers.1.mlp.gate'")):
        run(cfg, lm=tiny_lm, log=lambda s: None)
    cfg.hparams_overrides["edit_modules"] = ["model.layers.9.mlp.gate_proj"]
    with pytest.raises(UserError, match=re.escape("['model.layers.9.mlp.gate_proj'] name no "
                                                  "block in 0..3")):
        run(cfg, lm=tiny_lm, log=lambda s: None)
    with pytest.raises(UserError, match="not both"):
        hparams_from_dict(ultraedit.Hparams, {"layers": [1], "edit_modules": GATE_UP})


def test_namet_left_padding_moves_the_insertion_point_of_shorter_rows(tiny_lm, cf):
    hp = hparams_from_dict(namet.Hparams, {"layers": [1, 2], "mom2_update_weight": [1.0, 1.0],
                                           "context_template_texts":
                                               ["{}", "A long prefix of many words here. {}",
                                                "Short. {}"]})
    templates = namet.namet_context_templates(tiny_lm, hp)
    r = cf[0]
    from methods.keys import subject_site

    subject_last = tiny_lm.tokenizer(" " + r.subject, add_special_tokens=False)["input_ids"][-1]
    rows = namet._request_rows(tiny_lm, r, templates, hp)
    at = rows.ids[torch.arange(len(rows.cols)), rows.cols]
    pads = (rows.mask == 0).sum(1)
    assert int(pads[1]) == 0 and int(at[1]) == subject_last  # the longest row: exact
    assert int(pads[2]) > 0 and int(at[2]) != subject_last  # a shorter row: shifted
    assert (rows.ids[:-1, -1] == rows.ids[1, -1]).all()  # rewrite rows end with the target
    right = hparams_from_dict(namet.Hparams, {**hp.__dict__, "padding_side": "right"})
    rows_r = namet._request_rows(tiny_lm, r, templates, right)
    for j, ctx in enumerate(templates):
        site = subject_site(tiny_lm.tokenizer, r.prompt, r.subject, prefix=ctx)
        assert int(rows_r.cols[j]) == site.position
        assert int(rows_r.ids[j, site.position]) == subject_last


def test_namet_context_templates_follow_the_release(tiny_lm):
    hp = hparams_from_dict(namet.Hparams, {"layers": [1, 2], "mom2_update_weight": [1.0, 1.0],
                                           "namet_starters": ["The", "He", "Also"],
                                           "template_tokens": 3})
    tiny_lm.info["seed"] = 0
    t = namet.namet_context_templates(tiny_lm, hp)
    assert t[0] == "" and len(t) == 4
    assert all(x.startswith(s) for x, s in zip(t[1:], ["The", "He", "Also"], strict=True))
    assert all(x.endswith(". ") and "{" not in x for x in t[1:])
    assert namet.namet_context_templates(tiny_lm, hp) is t  # cached per model and seed


def test_new_methods_reject_bad_settings():
    from harness.errors import UserError

    with pytest.raises(UserError, match="one lambda per layer"):
        hparams_from_dict(namet.Hparams, {"layers": [1, 2], "mom2_update_weight": [1.0]})
    with pytest.raises(UserError, match="padding_side"):
        hparams_from_dict(namet.Hparams, {"padding_side": "middle"})
    with pytest.raises(UserError, match="mpes_prompts"):
        hparams_from_dict(encore.Hparams, {"mpes_prompts": "plain"})
    with pytest.raises(UserError, match="nse_alpha"):
        hparams_from_dict(nse.Hparams, {"nse_alpha": 60.0, "nse_upper_bound": 50.0})
    with pytest.raises(UserError, match="neuron_threshold"):
        hparams_from_dict(nse.Hparams, {"neuron_threshold": 0.0})
    with pytest.raises(UserError, match="chunk_size"):
        hparams_from_dict(ultraedit.Hparams, {"chunk_size": 0})
    assert math.isclose(hparams_from_dict(memit.Hparams, {}).mom2_update_weight, 15000.0)
