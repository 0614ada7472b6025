"""Fluency (n-gram entropy), consistency (TF-IDF cosine) and batched greedy generation."""

import math

import pytest
import torch

from methods.base import EditRequest
from suites import counterfact, fluency

# --- n-gram entropy ---------------------------------------------------------------------------


def test_ngram_entropy_known_string():
    toks = fluency.word_tokens("a b a b")
    assert toks == ["a", "b", "a", "b"]
    # bigrams (a,b) x2, (b,a) x1 -> H = -(2/3 log2 2/3 + 1/3 log2 1/3)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert fluency.ngram_entropy(toks, 2) == pytest.approx(h2)
    assert fluency.ngram_entropy(toks, 3) == pytest.approx(1.0)  # (a,b,a), (b,a,b)
    assert fluency.weighted_ngram_entropy("a b a b") == pytest.approx(
        (2 / 3 * h2 + 4 / 3 * 1.0) / 2)


def test_distinct_words_and_degenerate_texts():
    text = "one two three four five six seven eight"  # 8 distinct words
    assert fluency.ngram_entropy(fluency.word_tokens(text), 2) == pytest.approx(math.log2(7))
    assert fluency.weighted_ngram_entropy(text) == pytest.approx(
        math.log2(7) / 3 + 2 * math.log2(6) / 3)
    assert fluency.weighted_ngram_entropy("") == 0.0
    assert fluency.weighted_ngram_entropy("word") == 0.0
    assert fluency.weighted_ngram_entropy("the the the the the the") == 0.0
    assert fluency.mean_ngram_entropy([]) is None
    assert fluency.mean_ngram_entropy(["a b a b", text]) == pytest.approx(
        (fluency.weighted_ngram_entropy("a b a b") + fluency.weighted_ngram_entropy(text)) / 2)


def test_punctuation_is_a_token():
    assert fluency.word_tokens("Paris, France.") == ["Paris", ",", "France", "."]


# --- TF-IDF -----------------------------------------------------------------------------------


def test_tfidf_cosine_hand_computed():
    a, b = "apple banana", "apple cherry"
    idf = fluency.fit_idf([a, b])
    assert idf["apple"] == pytest.approx(1.0)  # ln(3/3) + 1
    x = math.log(3 / 2) + 1  # banana, cherry: df = 1
    assert idf["banana"] == pytest.approx(x)
    assert fluency.tfidf_similarity(a, b) == pytest.approx(1 / (1 + x * x))


def test_tfidf_identity_disjoint_case_and_short_tokens():
    assert fluency.tfidf_similarity("The Eiffel Tower", "the eiffel TOWER") == pytest.approx(1.0)
    assert fluency.tfidf_similarity("red green", "blue yellow") == 0.0
    assert fluency.tfidf_terms("A b cd, EF!") == ["cd", "ef"]
    assert fluency.tfidf_similarity("a b", "a b") == 0.0  # no term of 2+ characters
    vec = fluency.tfidf_vector("x yy yy zz", fluency.fit_idf(["yy zz", "yy"]))
    assert sum(v * v for v in vec.values()) == pytest.approx(1.0)
    assert fluency.consistency(["text"], []) is None


def test_consistency_prefers_the_reference_topic():
    refs = ["Paris is the capital of France", "France borders Spain"]
    close = fluency.consistency(["He lived in Paris, France for years"], refs)
    far = fluency.consistency(["The violin concerto was composed in 1878"], refs)
    assert close > far >= 0.0


# --- generation -------------------------------------------------------------------------------


def test_left_pad():
    ids, mask = fluency.left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _greedy_no_cache(lm, prompt, n):
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            nxt = lm.model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == lm.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0]


def test_batched_left_padded_generation_equals_unpadded(tiny_lm):
    prompts = ["The Eiffel Tower is located in the city of", "Paris",
               "Danielle Darrieux speaks the language"]
    batched = fluency.generate_greedy(tiny_lm, prompts, max_new_tokens=6, batch_size=3)
    single = [fluency.generate_greedy(tiny_lm, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    tok = tiny_lm.tokenizer
    for p, text in zip(prompts, single, strict=True):
        ref = _greedy_no_cache(tiny_lm, p, 6)
        n_prompt = len(tok(p)["input_ids"])
        assert text == tok.decode(ref[n_prompt:], skip_special_tokens=True)


def test_generation_metrics_sources_and_notes(tiny_lm):
    knowedit = EditRequest(case_id="1", prompt="The mother tongue of {} is",
                           subject="Danielle Darrieux", target_new="English",
                           target_true="French", paraphrase_prompts=("Darrieux speaks",))
    canonical = EditRequest(case_id="2", prompt="{} is located in", subject="Eiffel Tower",
                            target_new="Rome", target_true="Paris",
                            generation_prompts=("The Eiffel Tower is", "People visit"),
                            reference_texts=("Rome is the capital of Italy",))
    a, b = fluency.generation_metrics(tiny_lm, [knowedit, canonical], max_new_tokens=4)
    assert a["generation_source"] == "rewrite+paraphrase prompts"
    assert len(a["generations"]) == 2 and a["reference_score"] is None
    assert "fluency: not available (no generation_prompts in this data)" in a["generation_note"]
    assert "consistency: not available" in a["generation_note"]
    assert b["generation_source"] == "generation_prompts" and b["generation_note"] is None
    assert len(b["generations"]) == 2 and 0.0 <= b["reference_score"] <= 1.0
    assert a["ngram_entropy"] >= 0.0


def test_counterfact_evaluate_with_generation(tiny_lm):
    req = EditRequest(case_id="7", prompt="The mother tongue of {} is",
                      subject="Danielle Darrieux", target_new="English", target_true="French",
                      paraphrase_prompts=("Darrieux speaks",),
                      neighborhood_prompts=("Michel Rocard speaks",), neighborhood_target="French")
    (plain,) = counterfact.evaluate(tiny_lm, [req])
    (rec,) = counterfact.evaluate(tiny_lm, [req], generation_tokens=3)
    assert "ngram_entropy" not in plain
    assert rec["efficacy_success"] == plain["efficacy_success"]
    assert rec["generation_source"] == "rewrite+paraphrase prompts"
    summary = counterfact.summarize([rec])
    assert summary["ngram_entropy"] == pytest.approx(rec["ngram_entropy"])
    assert "reference_score" not in summary
