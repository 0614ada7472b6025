"""ROME / MEMIT / AlphaEdit on a tiny random model: the pipeline runs, targets are reached,
diagnostics are recorded, AlphaEdit's sequential state protects earlier keys."""

from __future__ import annotations

import pytest
import torch

from methods import get_method
from methods.base import hparams_from_dict
from methods.keys import averaged_keys, context_templates, split_template, subject_site
from methods.locate import templates_for
from suites.counterfact import load

# the random model has tiny hidden states (|z0| ~ 0.25): free the target from clamp and decay
SMALL = dict(stats_tokens=4000, stats_seq_len=64, v_steps=8, n_context=2, context_length=4,
             clamp_norm_factor=200.0, v_weight_decay=0.0)


@pytest.fixture(scope="module")
def requests_(shared_data):
    return load(shared_data / "counterfact" / "counterfact-edit.json")[:4]


def _snapshot(lm, layers):
    return {layer: lm.rewrite_weight(layer).clone() for layer in layers}


def _restore(lm, snap):
    with torch.no_grad():
        for layer, w in snap.items():
            lm.rewrite_weight(layer).copy_(w)


def test_split_template_unescapes():
    assert split_template("a {{x}} {} b") == ("a {x} ", " b")
    with pytest.raises(ValueError):
        split_template("no field")


def test_subject_site_is_last_subject_token(tiny_lm):
    tok = tiny_lm.tokenizer
    site = subject_site(tok, "The mother tongue of {} is", "Danielle Darrieux")
    ids = tok(site.text)["input_ids"]
    head = tok.decode(ids[:site.position + 1])
    assert head.endswith("Darrieux")


@pytest.mark.parametrize("name,layers", [("rome", [2]), ("memit", [1, 2]),
                                         ("alphaedit", [1, 2])])
def test_method_edits_and_reports_diagnostics(tiny_lm, corpus, requests_, name, layers):
    mod = get_method(name)
    hp = hparams_from_dict(mod.Hparams, {**SMALL, "layers": layers, "stats_corpus": corpus,
                                         "v_lr": 0.5})
    snap = _snapshot(tiny_lm, range(tiny_lm.n_layers))
    try:
        out = mod.edit(tiny_lm, requests_[:2], hp, {})
        changed = [layer for layer in range(tiny_lm.n_layers)
                   if not torch.equal(snap[layer], tiny_lm.rewrite_weight(layer))]
        assert changed == layers
        for d in out.diagnostics:
            for key in ("rho", "z_error", "phi", "residual_norm", "update_norm"):
                assert key in d and d[key] == d[key], key  # present and not NaN
            assert d["target_nll_final"] < d["target_nll_init"]
            assert 0.0 <= d["phi"] <= 1.0 + 1e-6  # P is stored in float32
    finally:
        _restore(tiny_lm, snap)


@pytest.mark.parametrize("model_fixture", ["tiny_lm", "tiny_gemma3"])
def test_rome_realises_its_target_at_the_key(request, model_fixture, corpus, requests_):
    """ROME's write is exact at the (context-averaged) key: W' k - W k = v - z_cur, also
    where a norm follows the MLP (Gemma 3: the value is the MLP output, not the residual)."""
    tiny_lm = request.getfixturevalue(model_fixture)
    mod = get_method("rome")
    hp = hparams_from_dict(mod.Hparams, {**SMALL, "layers": [2], "stats_corpus": corpus,
                                         "n_context": 0})
    snap = _snapshot(tiny_lm, [2])
    try:
        out = mod.edit(tiny_lm, requests_[:1], hp, {})
        # with only the plain template, key and realised state are read at the same site
        assert out.diagnostics[0]["rho"] == pytest.approx(1.0, abs=1e-4)
        assert out.diagnostics[0]["z_error"] < 1e-3
    finally:
        _restore(tiny_lm, snap)


def test_alphaedit_state_accumulates_and_protects_earlier_keys(tiny_lm, corpus, requests_):
    mod = get_method("alphaedit")
    hp = hparams_from_dict(mod.Hparams, {**SMALL, "layers": [2], "stats_corpus": corpus,
                                         "L2": 1e-8, "nullspace_threshold": 1e9})
    # threshold 1e9: P = I, so protection comes from the accumulated keys alone
    snap = _snapshot(tiny_lm, [2])
    try:
        templates = templates_for(tiny_lm, hp)
        s1 = mod.edit(tiny_lm, requests_[:2], hp, {}).state
        assert set(s1) == {"prev_cov.2"}
        K1, _ = averaged_keys(tiny_lm, requests_[:2], templates, [2], averaging=hp.key_averaging)
        w1 = tiny_lm.rewrite_weight(2).clone()
        s2 = mod.edit(tiny_lm, requests_[2:4], hp, s1).state
        d2 = tiny_lm.rewrite_weight(2) - w1
        moved = (d2.double() @ K1[2].double()).norm() / (w1.double() @ K1[2].double()).norm()
        assert moved < 1e-3
        assert torch.linalg.matrix_rank(s2["prev_cov.2"]) > torch.linalg.matrix_rank(
            s1["prev_cov.2"])
    finally:
        _restore(tiny_lm, snap)


def test_group_lengths_minimises_padded_tokens_plus_call_cost():
    """The dynamic programme equals a brute force over every contiguous split."""
    import itertools

    from methods.targets import group_lengths

    def cost(lengths, counts, bounds, overhead):
        total = 0.0
        for lo, hi in bounds:
            rows = sum(c for v, c in zip(lengths, counts, strict=True) if lo <= v <= hi)
            total += rows * hi + overhead
        return total

    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        lengths = sorted(set(torch.randint(1, 12, (n,), generator=gen).tolist()))
        counts = torch.randint(1, 30, (len(lengths),), generator=gen).tolist()
        overhead = float(torch.randint(0, 80, (1,), generator=gen))
        got = group_lengths(lengths, counts, overhead)
        assert got[0][0] == lengths[0] and got[-1][1] == lengths[-1]
        brute = min(
            cost(lengths, counts, [(lengths[a], lengths[b - 1]) for a, b in
                                   zip((0, *cuts), (*cuts, len(lengths)), strict=True)], overhead)
            for k in range(len(lengths))
            for cuts in itertools.combinations(range(1, len(lengths)), k))
        assert cost(lengths, counts, got, overhead) == pytest.approx(brute)
    assert group_lengths([2, 3, 4], [5, 5, 5], 0.0) == [(2, 2), (3, 3), (4, 4)]
    assert group_lengths([2, 3, 4], [5, 5, 5], 1e9) == [(2, 4)]


@pytest.mark.parametrize("buckets", [True, False])
@pytest.mark.parametrize("model_fixture", ["tiny_lm", "tiny_gpt2", "tiny_gemma3"])
def test_prefix_cache_gives_the_full_forward_losses(request, model_fixture, requests_,
                                                    buckets, monkeypatch):
    """The cached-prefix target step equals the full forward, with and without an edit,
    with rows run in one padded batch or in buckets of equal suffix length."""
    import methods.targets
    from methods.targets import TargetProblem, add_at_sites

    monkeypatch.setattr(methods.targets, "BUCKET_OVERHEAD_TOKENS", 0)  # one bucket per length

    lm = request.getfixturevalue(model_fixture)
    templates = context_templates(lm, 2, 4)
    full = TargetProblem.build(lm, requests_[:3], templates)
    cached = TargetProblem.build(lm, requests_[:3], templates)
    cached.enable_prefix_cache(buckets=buckets)
    assert (len(cached.prefix["chunks"]) > 1) == buckets
    layer = lm.spec.layer(1)
    torch.manual_seed(0)
    delta = torch.randn(3, lm.model.config.hidden_size)
    for d in (torch.zeros_like(delta), delta):
        a = full.losses(add_at_sites(full, layer, d))
        b = cached.losses(add_at_sites(cached, layer, d))
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_fixture", ["tiny_lm", "tiny_gpt2", "tiny_gemma3"])
def test_skipping_lower_layers_gives_the_full_forward_losses(request, model_fixture,
                                                             requests_):
    """Starting the target step's forward at the edited layer (the suffix's input to it
    computed once) equals the full forward, with an edit at that layer's output and with a
    virtual write on its rewrite module (MetaKE's proxy); GPT-2's position embeddings are
    handled."""
    from methods.metake import virtual_write
    from methods.targets import TargetProblem, add_at_sites

    lm = request.getfixturevalue(model_fixture)
    templates = context_templates(lm, 2, 4)
    full = TargetProblem.build(lm, requests_[:3], templates)
    fast = TargetProblem.build(lm, requests_[:3], templates)
    full.enable_prefix_cache()
    fast.enable_prefix_cache()
    assert fast.skip_lower_layers(2) and fast.start["layer"] == 2
    torch.manual_seed(0)
    delta = torch.randn(3, lm.model.config.hidden_size)
    w = lm.rewrite_weight(2)
    write = 1e-2 * torch.randn_like(w)
    for make in (lambda pb: add_at_sites(pb, lm.spec.layer(2), delta),
                 lambda pb: (lambda: virtual_write(lm, 2, write))):
        a, b = full.losses(make(full)), fast.losses(make(fast))
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    # frozen requests' rows can be left out: the others' losses do not change
    active = torch.tensor([True, False, True])
    a = full.losses(add_at_sites(full, lm.spec.layer(2), delta))
    c = fast.losses(add_at_sites(fast, lm.spec.layer(2), delta), active=active)
    for x, y in zip(a, c, strict=True):
        torch.testing.assert_close(x[active], y[active], atol=1e-4, rtol=1e-4)
        assert float(y[1]) == 0.0
    # an edit below the start layer would be skipped: the caller must start lower
    assert fast.skip_lower_layers(1) and fast.start["layer"] == 1
    assert not fast.skip_lower_layers(0) and fast.start is None
