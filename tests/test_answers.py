"""Generation-based evaluation (greedy answers, EM, token F1) and CounterFact+ (NS+, NKL)
(issue 17, item 3), on tiny random models and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from harness.scoring import kl_divergence, next_token_logprobs
from suites import answers, counterfact, zsre
from suites.fluency import generate_greedy

# --- answer extraction and scores ---------------------------------------------------------------

@pytest.mark.parametrize("continuation,answer", [
    (" Paris. It is the capital", "Paris"),
    (" English\nFrench", "English"),
    (" the French language, which", "the French language"),
    (" Toyota; later", "Toyota"),
    (" 3.5 million", "3.5 million"),  # a period not followed by a space does not end it
    ("   ", ""),
])
def test_extract_answer_cuts_at_line_and_sentence_ends(continuation, answer):
    assert answers.extract_answer(continuation) == answer


def test_exact_match_and_token_f1_follow_squad():
    assert answers.normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert answers.exact_match("the French language", "French language") == 1.0
    assert answers.exact_match("French", "French language") == 0.0
    # precision 1/1, recall 1/2 -> F1 = 2/3
    assert answers.token_f1("French", "French language") == pytest.approx(2 / 3)
    # multiset overlap: "a" is an article (removed); "b b" against "b": p = 1/2, r = 1
    assert answers.token_f1("b b", "a b") == pytest.approx(2 / 3)
    assert answers.token_f1("", "") == 1.0 and answers.token_f1("x", "") == 0.0
    assert answers.token_f1("Rome", "Paris") == 0.0


def test_answer_metrics_score_the_model_s_own_greedy_answer(tiny_lm):
    """EM is 1 against the answer the model itself generates and 0 against another string;
    batching does not change the answers."""
    prompts = ["The capital of France is", "Danielle Darrieux speaks", "Apple was founded by"]
    texts = generate_greedy(tiny_lm, prompts, 6, batch_size=1)
    own = [answers.extract_answer(t) for t in texts]
    items = [{"efficacy": [(p, a)], "neighborhood": [(p, "zzqx unrelated")]}
             for p, a in zip(prompts, own, strict=True)]
    out = answers.answer_metrics(tiny_lm, items, 6, batch_size=3)
    for rec, a in zip(out, own, strict=True):
        assert rec["answers"]["efficacy"] == [a]
        if answers.normalize(a):
            assert rec["gen_efficacy_em"] == 1.0 and rec["gen_efficacy_f1"] == 1.0
        assert rec["gen_neighborhood_em"] == 0.0
        assert rec["gen_paraphrase_em"] is None  # no prompt in that group: missing, not 0


# --- next-token distributions and KL ----------------------------------------------------------

def test_next_token_logprobs_match_a_plain_forward_pass(tiny_lm):
    prompts = ["a", "The Eiffel Tower is located in the city of", "Paris is"]
    lp = next_token_logprobs(tiny_lm, prompts, batch_size=2)
    tok = tiny_lm.tokenizer
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, -1].float(), -1)
        torch.testing.assert_close(lp[i], ref, atol=1e-4, rtol=1e-4)


def test_kl_divergence_against_torch():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    q = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    ours = kl_divergence(p, q)
    # torch: kl_div(input=log q, target=log p, log_target) sums p (log p - log q)
    ref = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours.float(), ref, atol=1e-6, rtol=1e-5)
    assert torch.all(kl_divergence(p, p) == 0)


# --- the suites ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cf_requests(shared_data):
    return counterfact.load(shared_data / "counterfact" / "counterfact-edit.json")[:3]


def test_counterfact_plus_prompt_prepends_the_edit(cf_requests):
    r = cf_requests[0]
    p = counterfact.plus_prompt(r, r.neighborhood_prompts[0])
    assert p == (f"{r.rewrite_prompt} {r.target_new.strip()}. {r.neighborhood_prompts[0]}")


def test_counterfact_nkl_is_zero_unedited_and_grows_with_a_change(tiny_lm, cf_requests, restore):
    ref = counterfact.reference(tiny_lm, cf_requests)
    recs = counterfact.evaluate(tiny_lm, cf_requests, reference=ref, answer_tokens=4)
    for rec in recs:
        assert rec["neighborhood_kl"] == 0.0 and rec["neighborhood_plus_kl"] == 0.0
        assert rec["neighborhood_plus_success"] in (0.0, 1.0)
        for g in answers.GROUPS:  # an exact match is a token F1 of 1
            assert 0.0 <= rec[f"gen_{g}_em"] <= rec[f"gen_{g}_f1"] + 1e-12 <= 1.0 + 1e-12
    with torch.no_grad():
        w = tiny_lm.rewrite_weight(1)
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    after = counterfact.evaluate(tiny_lm, cf_requests, reference=ref)
    for rec in after:
        assert rec["neighborhood_kl"] > 0 and rec["neighborhood_plus_kl"] > 0
        v = tiny_lm.model.get_output_embeddings().weight.shape[0]
        assert rec["neighborhood_plus_kl_per_token"] == pytest.approx(
            rec["neighborhood_plus_kl"] / v)
        assert "gen_efficacy_em" not in rec  # answer_tokens=0: off
    summary = counterfact.summarize(recs)
    assert {"gen_efficacy_em", "neighborhood_plus_success", "neighborhood_kl"} <= set(summary)


def test_reference_must_match_the_cases(tiny_lm, cf_requests):
    ref = counterfact.reference(tiny_lm, cf_requests[:2])
    with pytest.raises(ValueError, match="reference for case"):
        counterfact.evaluate(tiny_lm, cf_requests[1:3], reference=ref)


def test_zsre_generation_fields_on_smollm2(smollm2, shared_data):
    """The real model answers zsRE questions: every record has EM/F1 in [0, 1] per group, F1 at
    least EM, and the answers are recorded."""
    reqs = zsre.load(shared_data / "zsre" / "zsre-mend-1k.json")[:4]
    recs = zsre.evaluate(smollm2, reqs, answer_tokens=8)
    for rec in recs:
        for g in answers.GROUPS:
            em, f1 = rec[f"gen_{g}_em"], rec[f"gen_{g}_f1"]
            assert 0.0 <= em <= f1 + 1e-12 <= 1.0 + 1e-12
        assert set(rec["answers"]) == set(answers.GROUPS)
