"""Generation metrics of ROME (Meng et al., NeurIPS 2022, sec. 4.2 and appendix): fluency as
weighted n-gram entropy, consistency as TF-IDF cosine similarity, and the greedy batched
generation they are computed on.

Fluency (ROME's ``compute_n_gram_entropy``): for a text with word tokens w_1..w_m and the
empirical distribution p_n of its n-grams, H_n = -sum_g p_n(g) log2 p_n(g) (bits); the score is
the arithmetic mean of the weighted entropies, (2/3 * H_2 + 4/3 * H_3) / 2 = H_2/3 + 2 H_3/3,
averaged over a case's generations. Repetitive text has low entropy. ROME tokenises words with
NLTK's ``word_tokenize``; here a regular expression (runs of word characters, or single
punctuation marks) stands in for it, which splits contractions differently (``don't`` ->
``don ' t``), a small, systematic difference. ROME's tables show the score times 100.

Consistency (ROME's ``tfidf_similarity``): the cosine between the TF-IDF vectors of all of a
case's generations joined and all of its reference texts joined (Wikipedia snippets about the new
object). TF = raw counts of lowercased words of two or more word characters; IDF smoothed as in
scikit-learn, idf(t) = ln((1 + N) / (1 + df(t))) + 1; vectors L2-normalised. ROME fits the IDF on
Wikipedia; here it is fitted on the documents given (or any corpus passed in), so values are
comparable within this harness, not with ROME's tables.

Generation: greedy (ROME samples with top-k = 5; greedy makes runs deterministic), with the KV
cache, many prompts per batch, left-padded so that every prompt's last token is at the same
position. As in ROME, the entropy is computed on the prompt followed by its continuation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

_WORD = re.compile(r"\w+|[^\w\s]")
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


# ---------------------------------------------------------------------------------------------
# Fluency: n-gram entropy
# ---------------------------------------------------------------------------------------------


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks of ``text`` (a stand-in for NLTK's ``word_tokenize``)."""
    return _WORD.findall(text)


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
                     corpus: Sequence[str] | None = None) -> float:
    """ROME's consistency: cosine of the TF-IDF vectors of two texts, with the IDF fitted on
    ``corpus`` (default: the two texts themselves)."""
    idf = fit_idf(list(corpus) if corpus is not None else [text_a, text_b])
    return cosine(tfidf_vector(text_a, idf), tfidf_vector(text_b, idf))


def consistency(generations: Sequence[str], references: Sequence[str]) -> float | None:
    """TF-IDF cosine between all generations joined and all references joined (ROME joins the
    full texts, prompt included), the IDF fitted on the individual generations and references
    of this case; None without references."""
    if not references or not generations:
        return None
    return tfidf_similarity(" ".join(generations), " ".join(references),
                            corpus=[*generations, *references])


# ---------------------------------------------------------------------------------------------
# Greedy generation
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


def generation_prompts_for(request) -> tuple[tuple[str, ...], str]:
    """The prompts to generate from and where they came from: the suite's own generation
    prompts (canonical CounterFact) or, when the data has none, the rewrite and paraphrase
    prompts."""
    if request.generation_prompts:
        return tuple(request.generation_prompts), "generation_prompts"
    return (request.rewrite_prompt, *request.paraphrase_prompts), "rewrite+paraphrase prompts"


def generation_metrics(lm, requests: Sequence, max_new_tokens: int,
                       batch_size: int = 16) -> list[dict]:
    """Per request: greedy generations, their fluency (``ngram_entropy``) and, where the
    request carries reference texts, consistency (``reference_score``), with notes saying what
    was not available."""
    plan = [generation_prompts_for(r) for r in requests]
    flat = [p for prompts, _ in plan for p in prompts]
    texts = generate_greedy(lm, flat, max_new_tokens, batch_size) if flat else []
    out, k = [], 0
    for r, (prompts, source) in zip(requests, plan, strict=True):
        gens = texts[k:k + len(prompts)]
        k += len(prompts)
        full = [p + g for p, g in zip(prompts, gens, strict=True)]
        notes = []
        if source != "generation_prompts":
            notes.append("fluency: not available (no generation_prompts in this data); "
                         "computed on generations from the rewrite+paraphrase prompts")
        if not r.reference_texts:
            notes.append("consistency: not available (no reference texts in this data)")
        out.append({
            "ngram_entropy": mean_ngram_entropy(full),
            "reference_score": consistency(full, r.reference_texts),
            "generation_source": source,
            "generation_note": "; ".join(notes) or None,
            "generations": gens,
        })
    return out
