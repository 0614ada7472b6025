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
    # greedy: this test is about sources and notes (sampling: the tests below)
    a, b = fluency.generation_metrics(tiny_lm, [knowedit, canonical], max_new_tokens=4,
                                      decoding="greedy")
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
    (rec,) = counterfact.evaluate(tiny_lm, [req], generation_tokens=3, decoding="greedy")
    assert "ngram_entropy" not in plain
    assert rec["efficacy_success"] == plain["efficacy_success"]
    assert rec["generation_source"] == "rewrite+paraphrase prompts"
    summary = counterfact.summarize([rec])
    assert summary["ngram_entropy"] == pytest.approx(rec["ngram_entropy"])
    assert "reference_score" not in summary


# --- NLTK words, sampled decoding, consistency against references ------------------------------


def test_words_follow_nltk_word_tokenize():
    # Treebank rules per Punkt sentence: contractions split, quotes as `` '', every period of a
    # sentence end its own token (NLTKWordTokenizer alone would keep "go." together)
    assert fluency.word_tokens('He didn\'t go. She said "yes" at 5 today.') == [
        "He", "did", "n't", "go", ".", "She", "said", "``", "yes", "''", "at", "5", "today",
        "."]
    # the documented difference: untrained Punkt ends a sentence at "p.m." (the English model
    # knows the abbreviation and word_tokenize keeps "p.m." whole)
    assert fluency.word_tokens("at 5 p.m. today.")[2:4] == ["p.m", "."]


def _sampled_no_cache(lm, prompt, seed, max_out_len, top_k=5):
    """Reference: one prompt, no padding, no KV cache, the same uniforms and inverse CDF."""
    ids = lm.tokenizer(prompt)["input_ids"]
    u = torch.rand(max(0, max_out_len - len(ids)), generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    with torch.no_grad():
        for t in range(len(u)):
            probs = torch.softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double(),
                                  dim=-1)
            top_p, top_i = probs.topk(top_k)
            cdf = (top_p / top_p.sum()).cumsum(0)
            ids.append(int(top_i[min(int((cdf < u[t]).sum()), top_k - 1)]))
    return fluency.clean_sampled_text(lm.tokenizer.decode(ids, skip_special_tokens=False)), ids


def test_sampled_generation_matches_unbatched_reference(tiny_lm):
    prompts = ["The Eiffel Tower is located in the city of", "Paris",
               "Danielle Darrieux speaks the language"]
    seeds = [fluency.prompt_seed(0, "7", j) for j in range(3)]
    batched = fluency.generate_sampled(tiny_lm, prompts, seeds, max_out_len=14, batch_size=3)
    for p, s, text in zip(prompts, seeds, batched, strict=True):
        ref, ids = _sampled_no_cache(tiny_lm, p, s, 14)
        assert text == ref and len(ids) == 14  # 14 tokens in total, prompt included
    single = [fluency.generate_sampled(tiny_lm, [p], [s], max_out_len=14)[0]
              for p, s in zip(prompts, seeds, strict=True)]
    assert single == batched  # a text does not depend on its batch
    other = fluency.generate_sampled(tiny_lm, prompts, [s + 1 for s in seeds], max_out_len=14)
    assert other != batched
    greedy = fluency.generate_greedy(tiny_lm, prompts, max_new_tokens=14 - 1)
    assert [p + g for p, g in zip(prompts, greedy, strict=True)] != batched
    assert fluency.prompt_seed(0, "7", 1) != fluency.prompt_seed(1, "7", 1)


def test_decoding_option_and_seeded_metrics(tiny_lm):
    req = EditRequest(case_id="3", prompt="{} is located in", subject="Eiffel Tower",
                      target_new="Rome", target_true="Paris",
                      generation_prompts=("The Eiffel Tower is", "People visit"))
    (a,) = fluency.generation_metrics(tiny_lm, [req], max_new_tokens=4, seed=0)
    (b,) = fluency.generation_metrics(tiny_lm, [req], max_new_tokens=4, seed=0)
    (c,) = fluency.generation_metrics(tiny_lm, [req], max_new_tokens=4, decoding="greedy")
    assert a == b and a["generation_decoding"] == "sample_top5_100"
    assert c["generation_decoding"] == "greedy" and c["generations"] != a["generations"]
    assert all(g.startswith(p) for g, p in zip(c["generations"], req.generation_prompts,
                                                 strict=True))
    assert a["ngram_entropy"] == pytest.approx(fluency.mean_ngram_entropy(a["generations"]))
    assert a["reference_score"] is None  # no reference texts: missing, not 0
    with pytest.raises(ValueError, match="is not one of sample_top5_100, greedy"):
        fluency.generation_metrics(tiny_lm, [req], max_new_tokens=4, decoding="beam")


def test_consistency_uses_a_fitted_idf_not_the_case_texts():
    idf = fluency.fit_idf(["Paris is in France", "Rome is in Italy", "Italy and France",
                           "music of Paris"])
    gens, refs = ["Paris and Rome"], ["Rome is in Italy"]
    got = fluency.consistency(gens, refs, idf)
    assert got == pytest.approx(fluency.cosine(fluency.tfidf_vector(gens[0], idf),
                                               fluency.tfidf_vector(refs[0], idf)))
    assert got != pytest.approx(fluency.consistency(gens, refs))  # own-texts IDF differs
    assert fluency.consistency(gens, [], idf) is None


def test_canonical_counterfact_reference_texts_and_idf(tmp_path, tiny_lm):
    import json

    cf = [{"case_id": 0, "requested_rewrite": {
        "prompt": "{} is located in", "subject": "Eiffel Tower", "relation_id": "P17",
        "target_new": {"str": "Italy", "id": "Q38"}, "target_true": {"str": "France",
                                                                    "id": "Q142"}},
        "paraphrase_prompts": ["The Eiffel Tower is in"],
        "neighborhood_prompts": ["The Louvre is in"], "attribute_prompts": [],
        "generation_prompts": ["The Eiffel Tower is"]}]
    snips = [{"relation_id": "P17", "target_id": "Q38",
              "samples": [{"name": "Rome", "text": "Rome is the capital of Italy."},
                          {"name": "Milan", "text": "Milan is a city in Italy."}]},
             {"relation_id": "P17", "target_id": "Q142",
              "samples": [{"name": "Lyon", "text": "Lyon is a city in France."}]}]
    (tmp_path / "counterfact.json").write_text(json.dumps(cf))
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snips))
    (req,) = counterfact.load(tmp_path / "counterfact.json")
    assert req.reference_texts == ("Rome is the capital of Italy.", "Milan is a city in Italy.")
    (rec,) = counterfact.evaluate(tiny_lm, [req], generation_tokens=1, seed=0)
    idf = fluency.fit_idf(["Rome is the capital of Italy.", "Milan is a city in Italy.",
                           "Lyon is a city in France."])
    assert rec["reference_score"] == pytest.approx(
        fluency.consistency(rec["generations"], req.reference_texts, idf))
    (tmp_path / "attribute_snippets.json").unlink()
    (bare,) = counterfact.load(tmp_path / "counterfact.json")
    assert bare.reference_texts == ()
