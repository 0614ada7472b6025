"""Generation metrics of ROME (Meng et al., NeurIPS 2022, sec. 4.2 and appendix): fluency as
weighted n-gram entropy, consistency as TF-IDF cosine similarity, and the batched generation
they are computed on.

Generation (``decoding``, :data:`DECODINGS`, recorded as the run config's
``fluency_decoding``):

* ``sample_top5_100`` (default; ROME's ``generate_fast``, ``test_generation``): top-k sampling
  with k = 5 (softmax, keep the 5 most likely tokens, renormalise, draw) until the sequence,
  prompt tokens included, is 100 tokens long; no stop at the end-of-sequence token. The text is
  the whole sequence decoded with special tokens, NFKD-normalised, ``"\n\n"`` -> ``" "``,
  ``"<|endoftext|>"`` removed (as the original). Reproducible: each prompt draws from its own
  generator seeded by (run seed, case id, prompt index) (:func:`prompt_seed`), by inverse
  CDF over the 5 renormalised probabilities (the same distribution as ``torch.multinomial``),
  so a text does not depend on the batch it ran in. ``--generation-tokens`` only switches
  generation on in this mode.
* ``greedy``: ``generation_tokens`` new tokens by argmax (stops at the end-of-sequence token);
  the text is the prompt followed by the decoded continuation.

Both batch prompts left-padded, with the KV cache.

Fluency (ROME's ``compute_n_gram_entropy``): for a text with word tokens w_1..w_m and the
empirical distribution p_n of its n-grams, H_n = -sum_g p_n(g) log2 p_n(g) (bits); the score is
the arithmetic mean of the weighted entropies, (2/3 * H_2 + 4/3 * H_3) / 2 = H_2/3 + 2 H_3/3,
averaged over a case's generations (prompt included). ROME splits words with NLTK's
``word_tokenize`` (Punkt sentences with the trained English model, then the Treebank-style
``NLTKWordTokenizer`` per sentence); here the same ``nltk`` tokenizers, but Punkt untrained
(the English model is a separate data download): the only difference is at abbreviations the
English model knows ("Mr.", "U.S." at a sentence end), which untrained Punkt may take as
sentence ends, so their period becomes a token of its own. ROME's tables show the score times
100.

Consistency (ROME's ``tfidf_similarity``): the cosine between the TF-IDF vectors of all of a
case's generation texts joined and all of its reference texts joined (canonical CounterFact:
the Wikipedia snippets of ``attribute_snippets.json`` about the new object). TF = raw counts of
lowercased words of two or more word characters; IDF smoothed as in scikit-learn,
idf(t) = ln((1 + N) / (1 + df(t))) + 1; vectors L2-normalised. The IDF is fitted once on a
corpus, as ROME fits it on all snippet texts (``dsets/tfidf_stats.py``), not on a case's own
texts; without reference texts (e.g. the KnowEdit CounterFact split) the score is None
(missing), never 0.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

#: values of ``decoding`` (the first is the default)
DECODINGS = ("sample_top5_100", "greedy")
SAMPLE_TOP_K = 5
SAMPLE_MAX_OUT_LEN = 100
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


# ---------------------------------------------------------------------------------------------
# Fluency: n-gram entropy
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _nltk_tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """Words and punctuation of ``text`` as NLTK's ``word_tokenize`` splits them (sentences by
    untrained Punkt, then ``NLTKWordTokenizer``; see the module docstring)."""
    sentences, words = _nltk_tokenizers()
    return [w for sent in sentences.tokenize(text) for w in words.tokenize(sent)]


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the empirical distribution of the n-grams of ``tokens``
    (0.0 when there are none)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def weighted_ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS,
                           weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's fluency of one text: mean over n of weight_n * H_n (defaults: bigrams and
    trigrams weighted 2/3 and 4/3)."""
    if len(orders) != len(weights) or not orders:
        raise ValueError("orders and weights must be non-empty and of equal length")
    tokens = word_tokens(text)
    return float(np.mean([w * ngram_entropy(tokens, n) for n, w in zip(orders, weights,
                                                                       strict=True)]))


def mean_ngram_entropy(texts: Sequence[str]) -> float | None:
    """Arithmetic mean of :func:`weighted_ngram_entropy` over texts (None for no texts)."""
    if not texts:
        return None
    return float(np.mean([weighted_ngram_entropy(t) for t in texts]))


# ---------------------------------------------------------------------------------------------
# Consistency: TF-IDF cosine
# ---------------------------------------------------------------------------------------------


def tfidf_terms(text: str) -> list[str]:
    """Lowercased words of at least two word characters (scikit-learn's default analyser)."""
    return _TFIDF_TOKEN.findall(text.lower())


def fit_idf(corpus: Sequence[str]) -> dict[str, float]:
    """Smoothed inverse document frequency, idf(t) = ln((1 + N) / (1 + df(t))) + 1."""
    df: Counter[str] = Counter()
    for doc in corpus:
        df.update(set(tfidf_terms(doc)))
    n = len(corpus)
    return {t: math.log((1 + n) / (1 + d)) + 1.0 for t, d in df.items()}


def tfidf_vector(text: str, idf: dict[str, float]) -> dict[str, float]:
    """L2-normalised TF-IDF vector of ``text`` as a sparse {term: weight} map; terms outside
    the fitted vocabulary are ignored (as scikit-learn's ``TfidfVectorizer.transform`` does)."""
    counts = Counter(t for t in tfidf_terms(text) if t in idf)
    vec = {t: c * idf[t] for t, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {t: v / norm for t, v in vec.items()} if norm > 0 else {}


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    """Cosine similarity of two sparse vectors (0.0 when either is empty)."""
    if len(a) > len(b):
        a, b = b, a
    dot = sum(v * b.get(t, 0.0) for t, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def tfidf_similarity(text_a: str, text_b: str,
                     corpus: Sequence[str] | None = None,
                     idf: dict[str, float] | None = None) -> float:
    """ROME's consistency: cosine of the TF-IDF vectors of two texts, with the IDF ``idf`` or
    one fitted on ``corpus`` (default: the two texts themselves)."""
    if idf is None:
        idf = fit_idf(list(corpus) if corpus is not None else [text_a, text_b])
    return cosine(tfidf_vector(text_a, idf), tfidf_vector(text_b, idf))


def consistency(generations: Sequence[str], references: Sequence[str],
                idf: dict[str, float] | None = None) -> float | None:
    """TF-IDF cosine between all generations joined and all references joined (ROME joins the
    full texts, prompt included), with ``idf`` fitted on a corpus (:func:`fit_idf`; ROME's: all
    reference snippets); None without references (missing, not 0). Without ``idf`` the IDF is
    fitted on this case's own texts (a fallback for tests, not comparable across cases)."""
    if not references or not generations:
        return None
    corpus = None if idf is not None else [*generations, *references]
    return tfidf_similarity(" ".join(generations), " ".join(references), corpus=corpus,
                            idf=idf)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T), with every sequence flush right."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def generate_greedy(lm, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
                    ) -> list[str]:
    """Greedy continuations (text after the prompt, special tokens dropped), batched and
    left-padded, with the KV cache. Stops at ``max_new_tokens`` or the end-of-sequence token."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              use_cache=True, pad_token_id=pad, eos_token_id=tok.eos_token_id)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths together
    out: list[str] = [""] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([enc[i] for i in idx], pad)
        gen = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                generation_config=config)
        new = gen[:, ids.shape[1]:].cpu()
        for i, row in zip(idx, new, strict=True):
            out[i] = tok.decode(row, skip_special_tokens=True)
    return out


def prompt_seed(seed: int, case_id: str, index: int) -> int:
    """Seed of one prompt's sampling generator: 63 bits of SHA-256(seed, case id, index)."""
    digest = hashlib.sha256(f"{seed}\0{case_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def clean_sampled_text(text: str, eos: str = "<|endoftext|>") -> str:
    """ROME's post-processing of a generated text: NFKD, ``"\n\n"`` -> ``" "``, no ``eos``."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace(eos, "")


@torch.inference_mode()
def generate_sampled(lm, prompts: Sequence[str], seeds: Sequence[int],
                     max_out_len: int = SAMPLE_MAX_OUT_LEN, top_k: int = SAMPLE_TOP_K,
                     batch_size: int = 16) -> list[str]:
    """Top-k sampling until each sequence (prompt tokens included, as the tokenizer encodes
    them by default) has ``max_out_len`` tokens; whole sequences decoded with special tokens
    and cleaned (:func:`clean_sampled_text`). Prompt ``i`` draws uniforms u_t from a generator
    seeded with ``seeds[i]`` and takes the first of the ``top_k`` tokens (most likely first)
    whose cumulative renormalised probability exceeds u_t. Left-padded batches, KV cache,
    explicit position ids (each row counts from its first real token)."""
    if max_out_len < 1 or top_k < 1:
        raise ValueError("max_out_len and top_k must be at least 1")
    if len(seeds) != len(prompts):
        raise ValueError("need one seed per prompt")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[str] = [""] * len(enc)
    dev = lm.device
    params = inspect.signature(lm.model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [enc[i] for i in idx]
        steps = [max(0, max_out_len - len(r)) for r in rows]
        n_steps = max(steps)
        new = torch.zeros(len(rows), n_steps, dtype=torch.long)
        if n_steps:
            u = torch.stack([torch.rand(n_steps, generator=torch.Generator().manual_seed(
                int(seeds[i])), dtype=torch.float64) for i in idx]).to(dev)
            ids, mask = left_pad(rows, pad)
            ids, mask = ids.to(dev), mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for t in range(n_steps):
                probs = torch.softmax(res.logits[:, -1].double(), dim=-1)
                top_p, top_i = probs.topk(top_k, dim=-1)
                cdf = (top_p / top_p.sum(-1, keepdim=True)).cumsum(-1)
                pick = (cdf < u[:, t:t + 1]).sum(-1).clamp(max=top_k - 1)
                nxt = top_i.gather(1, pick[:, None])
                new[:, t] = nxt[:, 0].cpu()
                if t + 1 == n_steps:
                    break
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                pos = pos[:, -1:] + 1
                res = lm.model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                               use_cache=True, **{cache_kw: _kv_cache(res)})
        for k, (i, row) in enumerate(zip(idx, rows, strict=True)):
            full = [*row, *new[k, :steps[k]].tolist()]
            out[i] = clean_sampled_text(tok.decode(full, skip_special_tokens=False))
    return out


def _kv_cache(res: Any) -> Any:
    """The KV cache of a model output (``cache``; ``past_key_values`` before 5.x)."""
    return res["cache"] if "cache" in res else res["past_key_values"]


def check_decoding(decoding: str) -> str:
    """``decoding`` if it is one of :data:`DECODINGS`, else a one-line ValueError."""
    if decoding not in DECODINGS:
        raise ValueError(f"fluency decoding {decoding!r} is not one of {', '.join(DECODINGS)}")
    return decoding


def generation_prompts_for(request) -> tuple[tuple[str, ...], str]:
    """The prompts to generate from and where they came from: the suite's own generation
    prompts (canonical CounterFact) or, when the data has none, the rewrite and paraphrase
    prompts."""
    if request.generation_prompts:
        return tuple(request.generation_prompts), "generation_prompts"
    return (request.rewrite_prompt, *request.paraphrase_prompts), "rewrite+paraphrase prompts"


def generation_metrics(lm, requests: Sequence, max_new_tokens: int,
                       batch_size: int = 16, decoding: str = "sample_top5_100", seed: int = 0,
                       idf: dict[str, float] | None = None) -> list[dict]:
    """Per request: generations (``decoding``, module docstring; ``max_new_tokens`` is used by
    ``greedy`` only), their fluency (``ngram_entropy``) and, where the request carries
    reference texts, consistency (``reference_score``, IDF ``idf`` or the one of the request's
    ``extra["reference_corpus"]`` file, :func:`reference_idf`; None without references), with
    notes saying what was not available and ``generation_decoding``."""
    check_decoding(decoding)
    plan = [generation_prompts_for(r) for r in requests]
    flat = [p for prompts, _ in plan for p in prompts]
    if decoding == "greedy":
        gens = generate_greedy(lm, flat, max_new_tokens, batch_size) if flat else []
        texts = [p + g for p, g in zip(flat, gens, strict=True)]
    else:
        seeds = [prompt_seed(seed, r.case_id, j) for r, (prompts, _) in zip(requests, plan,
                                                                            strict=True)
                 for j in range(len(prompts))]
        texts = generate_sampled(lm, flat, seeds, batch_size=batch_size) if flat else []
    out, k = [], 0
    for r, (prompts, source) in zip(requests, plan, strict=True):
        full = texts[k:k + len(prompts)]
        k += len(prompts)
        notes = []
        if source != "generation_prompts":
            notes.append("fluency: not available (no generation_prompts in this data); "
                         "computed on generations from the rewrite+paraphrase prompts")
        score = None
        if not r.reference_texts:
            notes.append("consistency: not available (no reference texts in this data)")
        else:
            case_idf = idf
            corpus = (r.extra or {}).get("reference_corpus")
            if case_idf is None and corpus:
                case_idf = reference_idf(corpus)
            score = consistency(full, r.reference_texts, case_idf)
        out.append({
            "ngram_entropy": mean_ngram_entropy(full),
            "reference_score": score,
            "generation_source": source,
            "generation_decoding": decoding,
            "generation_note": "; ".join(notes) or None,
            "generations": full,
        })
    return out


@lru_cache(maxsize=4)
def reference_idf(path: str) -> dict[str, float]:
    """The IDF fitted on every reference text of an ``attribute_snippets.json`` (ROME's
    ``collect_stats``: one document per snippet), computed once per process and file."""
    from suites.counterfact import snippet_documents

    return fit_idf(snippet_documents(path))
