"""The published code's behaviours behind named hparams (issue 13), on a tiny random Llama:
each switch does what its name says, and bad values are one-line errors."""

from __future__ import annotations

import pytest
import torch

from harness.errors import UserError
from methods import get_method
from methods.base import hparams_from_dict
from methods.keys import (
    STARTERS,
    average_keys,
    averaged_keys,
    keys_and_states,
    original_context_templates,
    request_sites,
)
from methods.locate import edit_batch, templates_for
from methods.solvers import rome_A, rome_A_general
from methods.targets import compute_targets
from suites.counterfact import load

# tiny hidden states (|z0| ~ 0.25): free the target from clamp and decay
SMALL = dict(stats_tokens=4000, stats_seq_len=64, v_num_grad_steps=6, clamp_norm_factor=200.0,
             v_weight_decay=0.0, context_templates=[[4, 5]])


@pytest.fixture(scope="module")
def requests_(shared_data):
    return load(shared_data / "counterfact" / "counterfact-edit.json")[:3]


def _hp(method: str, **kw):
    return hparams_from_dict(get_method(method).Hparams, {**SMALL, **kw})


# --- ROME ---------------------------------------------------------------------------------

@pytest.mark.parametrize("site", ["mlp", "residual"])
def test_rome_plain_denominator_is_exact_at_the_rewrite_prompt(tiny_lm, corpus, requests_,
                                                               restore, site):
    """denominator_key=plain (published compute_v): W' k_plain = v exactly, so rho on the
    rewrite prompt is 1 although the key direction is averaged over 21 templates;
    denominator_key=averaged (r-ROME) is exact at the averaged key instead."""
    kw = dict(layers=[2], stats_corpus=corpus, value_site=site,
              context_templates=[[3, 10], [5, 10]])
    hp = _hp("rome", denominator_key="plain", **kw)
    assert len(templates_for(tiny_lm, hp)) == 21
    w0 = tiny_lm.rewrite_weight(2).clone()
    plain: dict[int, torch.Tensor] = {}
    K, _ = averaged_keys(tiny_lm, requests_[:1], templates_for(tiny_lm, hp), [2],
                         averaging="uniform", plain=plain)
    d = get_method("rome").edit(tiny_lm, requests_[:1], hp, {}).diagnostics[0]
    assert d["rho"] == pytest.approx(1.0, abs=1e-4)
    assert d["z_error"] < 1e-3
    delta = (tiny_lm.rewrite_weight(2) - w0).double()
    # rank one along u = k_avg (mom2_adjustment on: C0^-1 k_avg); exact at the plain key
    assert torch.linalg.matrix_rank(delta, atol=1e-6 * float(delta.norm())) == 1
    with torch.no_grad():
        tiny_lm.rewrite_weight(2).copy_(w0)
    hp_avg = _hp("rome", denominator_key="averaged", **kw)
    d_avg = get_method("rome").edit(tiny_lm, requests_[:1], hp_avg, {}).diagnostics[0]
    assert abs(d_avg["rho"] - 1.0) > 1e-3  # the averaged key differs from the plain one
    delta_avg = (tiny_lm.rewrite_weight(2) - w0).double()
    # same direction, only the scale differs: by (u . k_avg) / (u . k_plain)
    ratio = (delta_avg @ K[2][:, 0].double()).norm() / (delta @ K[2][:, 0].double()).norm()
    assert float(ratio) != pytest.approx(1.0, abs=1e-3)
    assert float(plain[2].norm()) > 0


def test_rome_value_site_mlp_reads_and_clamps_at_the_mlp_output(tiny_lm, corpus, requests_):
    """value_site=mlp: z0 is the rewrite module's output at the plain prompt's subject token,
    and |delta| is clamped relative to it (published compute_v)."""
    hp = _hp("rome", layers=[2], stats_corpus=corpus, value_site="mlp", clamp_norm_factor=0.01,
             v_lr=1.0)
    templates = templates_for(tiny_lm, hp)
    sites = request_sites(tiny_lm, requests_[:1], templates)[:1]
    _, mlp = keys_and_states(tiny_lm, sites, [], [2], value_site="mlp")
    _, res = keys_and_states(tiny_lm, sites, [], [2], value_site="residual")
    assert not torch.allclose(mlp[2], res[2])
    z0, _, info, _ = compute_targets(tiny_lm, requests_[:1], 2, hp, templates)
    torch.testing.assert_close(z0[:, 0], mlp[2][0], atol=1e-5, rtol=1e-5)
    assert info[0]["delta_clamped"]
    assert info[0]["delta_norm"] == pytest.approx(0.01 * float(mlp[2][0].norm()), rel=1e-4)


def test_rome_A_general_mom2_adjustment_and_denominator():
    """A = u^T / (u^T k_d), u = C0^-1 k_u or k_u: exact at k_d, direction u; rome_A is the
    case k_d = k_u with C0."""
    gen = torch.Generator().manual_seed(0)
    d = 6
    X = torch.randn(50, d, generator=gen, dtype=torch.float64)
    C0 = X.T @ X / 50
    k_u, k_d = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(
        d, generator=gen, dtype=torch.float64)
    for C, u in ((C0, torch.linalg.solve(C0, k_u)), (None, k_u)):
        A = rome_A_general(k_u, k_d, C)
        assert float(A @ k_d) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(A[0] / A[0].norm(), u / u.norm() * torch.sign(u @ k_d))
    torch.testing.assert_close(rome_A_general(k_u, k_u, C0), rome_A(k_u, C0))


# --- keys -----------------------------------------------------------------------------------

def test_key_averaging_original_is_half_plain_half_prefixed(tiny_lm, corpus, requests_,
                                                            restore):
    """key_averaging=original (compute_ks): 0.5 k_plain + 0.5 mean(prefixed keys); uniform:
    the mean of all; the MEMIT write uses the configured one."""
    hp = _hp("memit", layers=[1, 2], stats_corpus=corpus)
    templates = templates_for(tiny_lm, hp)
    assert len(templates) == 6
    sites = request_sites(tiny_lm, requests_[:2], templates)
    keys, _ = keys_and_states(tiny_lm, sites, [1])
    k = keys[1].view(2, 6, -1)
    want = 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)
    torch.testing.assert_close(average_keys(k, "original"), want)
    torch.testing.assert_close(average_keys(k, "uniform"), k.mean(1))
    assert not torch.allclose(want, k.mean(1))
    for mode, expect in (("original", want), ("uniform", k.mean(1))):
        hp.key_averaging = mode
        _, written, _ = edit_batch(tiny_lm, requests_[:2], hp,
                                   lambda h, st: get_method("memit").solver_for(tiny_lm, h), {})
        # layer 1's keys do not depend on the writes at layers 1 and 2 (they are its input)
        torch.testing.assert_close(written.keys[1].T, expect, atol=1e-5, rtol=1e-5)


def test_context_template_texts_are_used_verbatim(tiny_lm, corpus, requests_, restore):
    """context_template_texts replaces generation by exactly the given templates (the
    original code's form "X. {}"), for keys and targets."""
    texts = ["{}", "Once upon a time. {}", "Yes. {}"]
    hp = _hp("alphaedit", layers=[1, 2], stats_corpus=corpus, context_template_texts=texts)
    assert templates_for(tiny_lm, hp) == ["", "Once upon a time. ", "Yes. "]
    K, _ = averaged_keys(tiny_lm, requests_[:2], ["", "Once upon a time. ", "Yes. "], [1],
                         averaging="original")
    _, written, _ = edit_batch(
        tiny_lm, requests_[:2], hp,
        lambda h, st: get_method("alphaedit").solver_for(tiny_lm, h, st, h.L2), {})
    torch.testing.assert_close(written.keys[1], K[1], atol=1e-5, rtol=1e-5)
    for bad in (["Once. {}"], ["{}", "no field"], ["{}", "a {} b"], ["{}", "a {x}. {}"]):
        with pytest.raises(UserError, match="context_template_texts"):
            _hp("alphaedit", context_template_texts=bad)


def test_original_templates_count_all_tokens_and_follow_the_starters(tiny_lm):
    """Published get_context_templates: n // 5 continuations per starter word, starter-major,
    up to ``length`` tokens in total (the starter included: length 1 adds nothing)."""
    got = original_context_templates(tiny_lm, [[1, 5], [4, 10]], seed=0)
    assert got[:6] == ["", *(s + ". " for s in STARTERS)]
    assert len(got) == 1 + 5 + 10
    for i, s in enumerate(STARTERS):
        assert got[6 + 2 * i].startswith(s) and got[7 + 2 * i].startswith(s)
    tok = tiny_lm.tokenizer
    longer = [t for t in got[6:] if len(tok(t[:-2])["input_ids"]) > 1]
    assert longer  # new tokens were sampled
    assert got == original_context_templates(tiny_lm, [[1, 5], [4, 10]], seed=0)
    assert got != original_context_templates(tiny_lm, [[1, 5], [4, 10]], seed=1)


# --- target step ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,updates", [({"v_num_grad_steps": 4}, 3),
                                            ({"v_num_grad_steps": 4, "v_steps": 4}, 4),
                                            ({"v_num_grad_steps": 1}, 0)])
def test_v_num_grad_steps_takes_one_update_less(tiny_lm, requests_, monkeypatch, fields,
                                                updates):
    """v_num_grad_steps = n (published loop): n iterations, the last one only evaluates:
    n - 1 Adam updates. v_steps = m (pre-issue-13 harness loop): exactly m updates."""
    calls = []
    orig = torch.optim.Adam.step

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    hp = _hp("memit", layers=[2], stop_loss=0.0, **fields)  # never stops early
    _, _, info, _ = compute_targets(tiny_lm, requests_[:2], 2, hp, templates_for(tiny_lm, hp))
    assert len(calls) == updates
    assert [i["target_steps"] for i in info] == [updates, updates]


def test_target_loop_stops_below_the_published_threshold(tiny_lm, requests_):
    """The loss is checked before each update; a request below stop_loss (5e-2) stops."""
    hp = _hp("memit", layers=[2], v_num_grad_steps=10, stop_loss=1e9)
    _, _, info, _ = compute_targets(tiny_lm, requests_[:2], 2, hp, templates_for(tiny_lm, hp))
    assert [i["target_steps"] for i in info] == [0, 0]


def test_rome_requests_written_first_edits_only_the_batch_s_first_request(tiny_lm, corpus,
                                                                          requests_, restore):
    """requests_written=first (the AlphaEdit repository's loop: apply_rome_to_model keeps
    request[0] of each chunk) writes one rank-one update for a batch of three; ``all`` writes
    three, one after the other."""
    kw = dict(layers=[2], stats_corpus=corpus, mom2_adjustment=False)
    w0 = tiny_lm.rewrite_weight(2).clone()
    first = get_method("rome").edit(tiny_lm, requests_, _hp("rome", requests_written="first",
                                                             **kw), {}).diagnostics
    d_first = (tiny_lm.rewrite_weight(2) - w0).double()
    assert [d["written"] for d in first] == [1.0, 0.0, 0.0] and "rho" in first[0]
    assert torch.linalg.matrix_rank(d_first, atol=1e-6 * float(d_first.norm())) == 1
    with torch.no_grad():
        tiny_lm.rewrite_weight(2).copy_(w0)
    alone = get_method("rome").edit(tiny_lm, requests_[:1], _hp("rome", **kw), {}).diagnostics
    assert torch.allclose((tiny_lm.rewrite_weight(2) - w0).double(), d_first)
    assert alone[0]["rho"] == pytest.approx(first[0]["rho"])
    with torch.no_grad():
        tiny_lm.rewrite_weight(2).copy_(w0)
    every = get_method("rome").edit(tiny_lm, requests_, _hp("rome", **kw), {}).diagnostics
    d_all = (tiny_lm.rewrite_weight(2) - w0).double()
    assert [d["written"] for d in every] == [1.0, 1.0, 1.0]
    assert torch.linalg.matrix_rank(d_all, atol=1e-6 * float(d_all.norm())) == 3


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,field,allowed", [
    ("memit", "key_averaging", "original, uniform"),
    ("alphaedit", "value_site", "residual, mlp"),
    ("rome", "denominator_key", "plain, averaged"),
    ("rome", "requests_written", "all, first"),
    ("metake", "key_averaging", "original, uniform"),
])
def test_unknown_switch_values_name_the_allowed_ones(method, field, allowed):
    with pytest.raises(UserError, match=f"{field}.*{allowed}.*'bogus'") as exc:
        _hp(method, **{field: "bogus"})
    assert "\n" not in str(exc.value)


def test_bad_template_schedules_are_errors():
    for bad in ([[10]], [[0, 5]], [[10, -1]]):
        with pytest.raises(UserError, match="context_templates"):
            _hp("memit", context_templates=bad)
    with pytest.raises(UserError, match="context_length"):
        _hp("memit", context_length=5)
    with pytest.raises(UserError, match="not both"):
        _hp("memit", n_context=2, context_template_texts=["{}"])


# --- presets in the run config ----------------------------------------------------------------

def test_preset_is_a_run_config_field_flag_and_part_of_the_identity(shared_data):
    from harness.cli import build_parser, config_from_args
    from harness.config import RunConfig
    from harness.prepare import prepare

    base = ["run", "--method", "rome", "--model", "smollm2-135m", "--n-edits", "2",
            "--data-dir", str(shared_data)]
    faithful = config_from_args(build_parser().parse_args(base))
    tuned = config_from_args(build_parser().parse_args([*base, "--preset", "tuned"]))
    assert (faithful.preset, tuned.preset) == ("faithful", "tuned")
    assert tuned.identity()["preset"] == "tuned"
    assert faithful.identity_hash() != tuned.identity_hash()
    p_f, p_t = prepare(faithful), prepare(tuned)
    assert p_f.hparams_source.endswith("rome/smollm2-135m.yaml")
    assert p_t.hparams_source.endswith("rome/smollm2-135m-tuned.yaml")
    assert (p_f.hparams.denominator_key, p_t.hparams.denominator_key) == ("plain", "averaged")
    with pytest.raises(UserError, match="--preset must be one of faithful, tuned"):
        RunConfig(preset="best").validate()
