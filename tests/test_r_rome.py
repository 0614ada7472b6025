"""r-ROME (Gupta et al. 2024) on a tiny random Llama: one consistent (averaged) key, so the
rank-one write realises the residual exactly at k_avg, and it differs from published ROME."""

from __future__ import annotations

import pytest
import torch

from harness.errors import UserError
from methods import get_method
from methods.base import hparams_from_dict, load_hparams
from methods.locate import edit_batch
from suites.counterfact import load

SMALL = dict(stats_tokens=4000, stats_seq_len=64, stats_sampling="tokens", v_num_grad_steps=6,
             clamp_norm_factor=200.0, v_weight_decay=0.0, context_templates=[[4, 5]],
             layers=[2])


def test_r_rome_write_is_exact_at_the_averaged_key(tiny_lm, corpus, shared_data, restore):
    """Delta k_avg = R (the residual z - h at the plain prompt) and Delta is rank one along
    C0^-1 k_avg, with k_avg averaged as MEMIT's compute_ks (half plain, half prefixed)."""
    req = load(shared_data / "counterfact" / "counterfact-edit.json")[:1]
    rr = get_method("r-rome")
    hp = hparams_from_dict(rr.Hparams, {**SMALL, "stats_corpus": corpus})
    assert (hp.key_averaging, hp.value_site, hp.denominator_key) == (
        "original", "residual", "averaged")
    w0 = tiny_lm.rewrite_weight(2).clone().double()
    _, written, _ = edit_batch(tiny_lm, req, hp, lambda h, st: rr.rome.solver_for(tiny_lm, h),
                               {})
    delta = tiny_lm.rewrite_weight(2).double() - w0
    k_avg = written.keys[2][:, 0].double()
    torch.testing.assert_close(delta @ k_avg, written.residual_first[:, 0].double(),
                               atol=1e-5, rtol=1e-4)
    assert torch.linalg.matrix_rank(delta, atol=1e-6 * float(delta.norm())) == 1


def test_r_rome_differs_from_published_rome_and_refuses_the_plain_denominator(
        tiny_lm, corpus, shared_data, restore):
    req = load(shared_data / "counterfact" / "counterfact-edit.json")[:1]
    w0 = tiny_lm.rewrite_weight(2).clone()
    deltas = []
    for name in ("r-rome", "rome"):
        m = get_method(name)
        hp = hparams_from_dict(m.Hparams, {**SMALL, "stats_corpus": corpus})
        m.edit(tiny_lm, req, hp, {})
        deltas.append(tiny_lm.rewrite_weight(2) - w0)
        with torch.no_grad():
            tiny_lm.rewrite_weight(2).copy_(w0)
    assert not torch.allclose(deltas[0], deltas[1], atol=1e-6)
    with pytest.raises(UserError, match="denominator_key"):
        hparams_from_dict(get_method("r-rome").Hparams, {**SMALL, "denominator_key": "plain"})


@pytest.mark.parametrize("model", ["gpt2-xl", "gpt-j-6b", "smollm2-135m", "gemma3-270m"])
def test_r_rome_files_load_with_the_release_settings(model):
    hp, _ = load_hparams(get_method("r-rome").Hparams, "r-rome", model)
    assert (hp.v_num_grad_steps, hp.v_lr, hp.v_weight_decay, hp.clamp_norm_factor) == (
        20, 0.5, 0.5, 4.0)
    assert hp.mom2_adjustment and hp.denominator_key == "averaged"
