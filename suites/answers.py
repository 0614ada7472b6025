"""Generation-based evaluation: does the edited model *say* the answer when it generates?

Teacher-forced success scores the target given the prompt and every earlier target token;
QAEdit (Yang et al., "The Mirage of Model Editing", arXiv 2502.11177) shows that this can
overstate what an edited model produces in real use. Here the model generates greedily from each
prompt and the answer it gives is compared with the reference:

* generation: greedy (argmax) decoding, the prompt encoded as for teacher-forced scoring (the
  tokenizer's special tokens), at most ``max_new_tokens`` new tokens, stopping at the
  end-of-sequence token (:func:`suites.fluency.generate_greedy`);
* the answer (:func:`extract_answer`): the continuation up to its first line break, then up to
  the first sentence end (``.``, ``!``, ``?`` or ``;`` followed by a space or the end of the
  text) or comma, stripped. A period inside an abbreviation followed by a space ("St. Louis")
  also ends the answer: a known limitation, which makes EM stricter, never looser;
* exact match (EM): the SQuAD normalisation (lower case, punctuation removed, the articles
  a/an/the removed, whitespace collapsed) of answer and reference are equal;
* token F1: SQuAD's F1 of the normalised whitespace tokens (the harmonic mean of the precision
  and recall of the multiset overlap); 1 when both are empty, 0 when one is.

References: ``target_new`` for the rewrite and paraphrase prompts (the edit must be said),
the neighbourhood prompt's own answer (CounterFact: ``target_true``; zsRE: ``loc_ans``) for
the neighbourhood prompts (what the model should still say). Record fields, each the mean over a
case's prompts of that group: ``gen_{efficacy,paraphrase,neighborhood}_{em,f1}``; the answers
themselves are in ``answers``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from suites.fluency import generate_greedy

#: new tokens generated per prompt by default (``RunConfig.answer_tokens``)
DEFAULT_ANSWER_TOKENS = 16
GROUPS = ("efficacy", "paraphrase", "neighborhood")
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|,")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def extract_answer(continuation: str) -> str:
    """The answer part of a generated continuation (see the module notes)."""
    text = continuation.split("\n", 1)[0]
    m = _SENTENCE_END.search(text)
    return (text[:m.start()] if m else text).strip()


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD token F1 of the normalised answer against the normalised reference."""
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def request_items(requests: Sequence[Any]) -> list[dict[str, list[tuple[str, str]]]]:
    """The (prompt, reference) pairs of each request by group: rewrite and paraphrase prompts
    against ``target_new``, neighbourhood prompts against their own answer
    (``neighborhood_target``, else ``target_true``)."""
    return [{"efficacy": [(r.rewrite_prompt, r.target_new)],
             "paraphrase": [(p, r.target_new) for p in r.paraphrase_prompts],
             "neighborhood": [(p, r.neighborhood_target or r.target_true)
                              for p in r.neighborhood_prompts]} for r in requests]


def answer_metrics(lm: Any, items: Sequence[dict[str, Sequence[tuple[str, str]]]],
                   max_new_tokens: int = DEFAULT_ANSWER_TOKENS, batch_size: int = 16
                   ) -> list[dict[str, Any]]:
    """Per case: ``items[i]`` maps a group (:data:`GROUPS`) to its (prompt, reference) pairs.
    All prompts of all cases are generated together; returns per case the EM/F1 fields (None
    for a group without prompts) and ``answers`` (group -> answers)."""
    flat = [(i, g, p, ref) for i, groups in enumerate(items) for g in GROUPS
            for p, ref in groups.get(g, ())]
    texts = generate_greedy(lm, [p for _, _, p, _ in flat], max_new_tokens,
                            batch_size=batch_size) if flat else []
    scored: list[dict[str, list[tuple[str, float, float]]]] = [{} for _ in items]
    for (i, g, _, ref), text in zip(flat, texts, strict=True):
        ans = extract_answer(text)
        scored[i].setdefault(g, []).append((ans, exact_match(ans, ref), token_f1(ans, ref)))
    out = []
    for per_case in scored:
        rec: dict[str, Any] = {}
        for g in GROUPS:
            rows = per_case.get(g, [])
            rec[f"gen_{g}_em"] = sum(r[1] for r in rows) / len(rows) if rows else None
            rec[f"gen_{g}_f1"] = sum(r[2] for r in rows) / len(rows) if rows else None
        rec["answers"] = {g: [r[0] for r in rows] for g, rows in per_case.items()}
        out.append(rec)
    return out
