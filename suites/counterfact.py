"""CounterFact (Meng et al., NeurIPS 2022): loader for both formats and the ES/PS/NS evaluation.

Formats:

* canonical ROME ``counterfact.json``: ``{case_id, requested_rewrite: {prompt (with "{}"),
  subject, target_new: {str}, target_true: {str}}, paraphrase_prompts, neighborhood_prompts,
  attribute_prompts, generation_prompts}``; neighbourhood prompts are scored against the true
  object.
* KnowEdit ``counterfact-{edit,val}.json``: ``{case_id, prompt (subject written out), subject,
  target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}``.

Reference texts (consistency, :mod:`suites.fluency`): for canonical records, the Wikipedia
snippets about the new object, ``attribute_snippets.json`` of the ROME data site
(``[{relation_id, target_id, samples: [{name, text}]}]``), read from beside the data file (or
its parent directory) when present: a case's references are the texts of
(``relation_id``, ``target_new.id``), as ROME's ``AttributeSnippets``. KnowEdit records have no
object ids, so no references (consistency is then None).

Metric definitions: :mod:`suites.metrics`.

CounterFact+ (Hoelscher-Obermaier et al., "Detecting Edit Failures In Large Language Models:
An Improved Specificity Benchmark", ACL Findings 2023): each neighbourhood prompt is also scored
with the edit statement prepended, ``f"{rewrite prompt} {target_new}. {neighbourhood prompt}"``
(the release's ``distracting_neighborhood_prompts``): ``neighborhood_plus_success`` /
``_magnitude`` as NS/NM on those prompts. Neighbourhood KL (NKL), on the plain and on the
prepended prompts (``neighborhood_kl``, ``neighborhood_plus_kl``): KL(P_edited || P_unedited)
of the next-token distribution after the prompt, in nats, averaged over a case's prompts; the
unedited distributions come from :func:`reference` (computed before any edit, kept as float32
on the CPU: 4 |V| bytes per prompt, 0.4 MB for SmolLM2's vocabulary). The release computes
this with ``torch.nn.functional.kl_div(..., reduction="batchmean")`` on a 1-D tensor, which
divides the sum by the vocabulary size; its published NKL values are therefore this number
divided by |V| (stored as ``neighborhood_plus_kl_per_token``, the published scale).

Generation-based evaluation (greedy answers, exact match and token F1; :mod:`suites.answers`)
when ``answer_tokens > 0``: rewrite and paraphrase prompts against ``target_new``,
neighbourhood prompts against their true object.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from harness.errors import DataError
from harness.scoring import kl_divergence, next_token_logprobs, score_targets
from methods.base import EditRequest
from suites import answers, fluency, metrics
from suites.data import read_json_records, require_str, require_str_list

NAME = "counterfact"
DEFAULT_FILES = ["counterfact/counterfact-edit.json", "counterfact/counterfact.json",
                 "counterfact.json"]
CANONICAL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


def _escape(s: str) -> str:
    return s.replace("{", "{{").replace("}", "}}")


def template_from_prompt(path: Path, i: int, prompt: str, subject: str, field: str) -> str:
    """Turn a prompt with the subject written out into a template with ``{}`` for it."""
    at = prompt.find(subject)
    if at < 0:
        raise DataError(path, f"subject {subject!r} does not occur in the prompt {prompt!r}",
                        i, field)
    return _escape(prompt[:at]) + "{}" + _escape(prompt[at + len(subject):])


SNIPPETS_FILE = "attribute_snippets.json"


def find_snippets(path: Path) -> Path | None:
    """``attribute_snippets.json`` beside the CounterFact file or in its parent directory."""
    for d in (path.parent, path.parent.parent):
        if (d / SNIPPETS_FILE).is_file():
            return d / SNIPPETS_FILE
    return None


@lru_cache(maxsize=4)
def _snippets(path: str) -> dict[tuple[str, str], tuple[str, ...]]:
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for i, rec in enumerate(read_json_records(Path(path))):
        rid, tid = rec.get("relation_id"), rec.get("target_id")
        samples = rec.get("samples")
        if not isinstance(samples, list):
            raise DataError(Path(path), "expected a list", i, "samples")
        texts = tuple(s["text"] for s in samples if isinstance(s, dict)
                      and isinstance(s.get("text"), str) and s["text"].strip())
        key = (str(rid), str(tid))
        out[key] = out.get(key, ()) + texts
    return out


def snippet_documents(path: str) -> list[str]:
    """Every snippet text of an ``attribute_snippets.json`` (the corpus ROME fits its IDF on)."""
    return [t for texts in _snippets(path).values() for t in texts]


def _reference_texts(rw: dict[str, Any], snippets: Path | None) -> tuple[str, ...]:
    new = rw.get("target_new")
    if snippets is None or not isinstance(new, dict) or new.get("id") is None:
        return ()
    return _snippets(str(snippets)).get((str(rw.get("relation_id")), str(new["id"])), ())


def _parse_canonical(path: Path, i: int, rec: dict[str, Any],
                     snippets: Path | None = None) -> EditRequest:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise DataError(path, "expected an object", i, "requested_rewrite")
    prompt = require_str(path, rw, i, "prompt")
    subject = require_str(path, rw, i, "subject")
    if "{}" not in prompt:
        prompt = template_from_prompt(path, i, prompt, subject, "requested_rewrite.prompt")
    new = require_str(path, rw, i, "target_new")
    true = require_str(path, rw, i, "target_true")
    if new.strip() == true.strip():
        raise DataError(path, "target_new equals target_true", i, "target_new")
    return EditRequest(
        case_id=str(rec.get("case_id", i)), prompt=prompt, subject=subject,
        target_new=new, target_true=true,
        paraphrase_prompts=require_str_list(path, rec, i, "paraphrase_prompts"),
        neighborhood_prompts=require_str_list(path, rec, i, "neighborhood_prompts"),
        neighborhood_target=true,
        generation_prompts=tuple(rec.get("generation_prompts", ())),
        attribute_prompts=tuple(rec.get("attribute_prompts", ())),
        reference_texts=_reference_texts(rw, snippets),
        extra={"relation_id": rw.get("relation_id"),
               **({"reference_corpus": str(snippets)} if snippets is not None else {})},
    )


def _parse_knowedit(path: Path, i: int, rec: dict[str, Any]) -> EditRequest:
    subject = require_str(path, rec, i, "subject")
    prompt = require_str(path, rec, i, "prompt")
    new = require_str(path, rec, i, "target_new")
    true = require_str(path, rec, i, "ground_truth")
    if new.strip() == true.strip():
        raise DataError(path, "target_new equals ground_truth", i, "target_new")
    loc_true = require_str(path, rec, i, "locality_ground_truth")
    return EditRequest(
        case_id=str(rec.get("case_id", i)),
        prompt=template_from_prompt(path, i, prompt, subject, "prompt"),
        subject=subject, target_new=new, target_true=true,
        paraphrase_prompts=require_str_list(path, rec, i, "rephrase_prompt"),
        neighborhood_prompts=require_str_list(path, rec, i, "locality_prompt"),
        neighborhood_target=loc_true,
    )


def load(path: str | Path) -> list[EditRequest]:
    """Validated requests from either format (detected per record); errors name record+field."""
    path = Path(path)
    out = []
    seen: set[str] = set()
    snippets = find_snippets(path)
    for i, rec in enumerate(read_json_records(path)):
        req = _parse_canonical(path, i, rec, snippets) if "requested_rewrite" in rec \
            else _parse_knowedit(path, i, rec)
        if req.case_id in seen:
            raise DataError(path, f"duplicate case_id {req.case_id}", i, "case_id")
        seen.add(req.case_id)
        out.append(req)
    return out


def plus_prompt(request: EditRequest, neighbour: str) -> str:
    """A CounterFact+ neighbourhood prompt: the edit statement, then the neighbourhood prompt."""
    return f"{request.rewrite_prompt} {request.target_new.strip()}. {neighbour}"


def _kl_prompts(requests: list[EditRequest]) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The plain and the CounterFact+ neighbourhood prompts of all requests, and per request
    (start, number of neighbourhood prompts, start of its plus prompts)."""
    plain = [p for r in requests for p in r.neighborhood_prompts]
    plus = [plus_prompt(r, p) for r in requests for p in r.neighborhood_prompts]
    spans, k = [], 0
    for r in requests:
        n = len(r.neighborhood_prompts)
        spans.append((k, n, len(plain) + k))
        k += n
    return plain + plus, spans


def reference(lm, requests: list[EditRequest], batch_size: int = 32) -> list[dict[str, Any]]:
    """Run before any edit: the unedited model's next-token log-probabilities (float32, CPU)
    after each neighbourhood prompt, plain and CounterFact+ (for the NKL). One dict per request
    (same order)."""
    prompts, spans = _kl_prompts(requests)
    lp = next_token_logprobs(lm, prompts, batch_size) if prompts else torch.empty(0, 0)
    return [{"case_id": r.case_id, "neighborhood": lp[a:a + n], "neighborhood_plus": lp[b:b + n]}
            for r, (a, n, b) in zip(requests, spans, strict=True)]


def _kl_fields(lm, requests: list[EditRequest], reference: list[dict[str, Any]],
               batch_size: int) -> list[dict[str, float | None]]:
    """Per request: the NKL on the plain and CounterFact+ neighbourhood prompts (nats)."""
    prompts, spans = _kl_prompts(requests)
    post = next_token_logprobs(lm, prompts, batch_size) if prompts else torch.empty(0, 0)
    vocab = post.shape[-1] if post.numel() else 1
    out = []
    for r, ref, (a, n, b) in zip(requests, reference, spans, strict=True):
        if ref.get("case_id") != r.case_id:
            raise ValueError(f"reference for case {ref.get('case_id')} given for case "
                             f"{r.case_id}")
        if n == 0:
            out.append({"neighborhood_kl": None, "neighborhood_plus_kl": None,
                        "neighborhood_plus_kl_per_token": None})
            continue
        # max(., 0): the unedited model scored in another batch composition differs by float
        # rounding (|KL| ~ 1e-8), which can make the sum slightly negative
        kl = max(float(kl_divergence(post[a:a + n], ref["neighborhood"]).mean()), 0.0)
        kl_plus = max(float(kl_divergence(post[b:b + n], ref["neighborhood_plus"]).mean()), 0.0)
        out.append({"neighborhood_kl": kl, "neighborhood_plus_kl": kl_plus,
                    "neighborhood_plus_kl_per_token": kl_plus / vocab})
    return out


def evaluate(lm, requests: list[EditRequest], batch_size: int = 32,
             generation_tokens: int = 0, decoding: str = "sample_top5_100",
             seed: int = 0, reference: list[dict[str, Any]] | None = None,
             answer_tokens: int = 0) -> list[dict[str, Any]]:
    """One record per request: ES/EM, PS/PM, NS/NM, NS+/NM+ (CounterFact+), the margin, and raw
    per-token log-probs; with ``reference`` (this slice of :func:`reference`) the NKL fields,
    with ``answer_tokens > 0`` the generation-based fields of :mod:`suites.answers`.

    All (prompt, object) pairs of all requests go through :func:`score_targets` together.
    With ``generation_tokens > 0`` each record also gets the generation metrics of
    :func:`suites.fluency.generation_metrics` (``decoding``: ``sample_top5_100``, seeded by
    ``seed`` and the case id, or ``greedy`` with ``generation_tokens`` new tokens):
    ``ngram_entropy`` (fluency), ``reference_score`` (consistency, None without reference
    texts), ``generation_source``, ``generation_decoding``, ``generation_note`` and
    ``generations``.
    """
    prompts: list[str] = []
    targets: list[str] = []
    layout = []  # per request: (group, start, end) triples; each prompt scored for new and true
    for r in requests:
        groups = {}
        for group, plist, (first, second) in (
            ("rewrite", [r.rewrite_prompt], (r.target_new, r.target_true)),
            ("paraphrase", list(r.paraphrase_prompts), (r.target_new, r.target_true)),
            ("neighborhood", list(r.neighborhood_prompts),
             (r.neighborhood_target or r.target_true, r.target_new)),
            ("neighborhood_plus", [plus_prompt(r, p) for p in r.neighborhood_prompts],
             (r.neighborhood_target or r.target_true, r.target_new)),
        ):
            start = len(prompts)
            for p in plist:
                prompts += [p, p]
                targets += [first, second]
            groups[group] = (start, len(prompts))
        layout.append(groups)
    scores = score_targets(lm, prompts, targets, batch_size=batch_size)
    mean_lp = metrics.mean_logprob(scores.logprobs) if prompts else torch.zeros(0)
    records = []
    for r, groups in zip(requests, layout, strict=True):
        rec: dict[str, Any] = {"case_id": r.case_id}
        raw: dict[str, Any] = {}
        for group, (a, b) in groups.items():
            first, second = mean_lp[a:b:2], mean_lp[a + 1:b:2]
            name = {"rewrite": "efficacy"}.get(group, group)
            if len(first) == 0:
                rec[f"{name}_success"] = None
                rec[f"{name}_magnitude"] = None
                continue
            rec[f"{name}_success"] = float(metrics.success(first, second).mean())
            rec[f"{name}_magnitude"] = float(metrics.magnitude(first, second).mean())
            keys = ("new", "true") if not group.startswith("neighborhood") else ("true", "new")
            raw[group] = {
                keys[0]: [scores.logprobs[j].tolist() for j in range(a, b, 2)],
                keys[1]: [scores.logprobs[j].tolist() for j in range(a + 1, b, 2)],
            }
        a, _ = groups["rewrite"]
        rec["efficacy_margin"] = float(metrics.margin(mean_lp[a], mean_lp[a + 1]))
        rec["logprob_new"] = float(mean_lp[a])
        rec["logprob_true"] = float(mean_lp[a + 1])
        rec["logprobs"] = raw
        records.append(rec)
    if reference is not None:
        if len(reference) != len(requests):
            raise ValueError("reference must have one entry per request")
        for rec, kl in zip(records, _kl_fields(lm, requests, reference, batch_size),
                           strict=True):
            rec.update(kl)
    if answer_tokens > 0:
        gens = answers.answer_metrics(lm, answers.request_items(requests), answer_tokens,
                                      batch_size=batch_size)
        for rec, gen in zip(records, gens, strict=True):
            rec.update(gen)
    if generation_tokens > 0:
        for rec, gen in zip(records, fluency.generation_metrics(
                lm, requests, generation_tokens, batch_size=min(batch_size, 16),
                decoding=decoding, seed=seed), strict=True):
            rec.update(gen)
    return records


SUMMARY_FIELDS = ["efficacy_success", "paraphrase_success", "neighborhood_success",
                  "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude",
                  "neighborhood_plus_success", "neighborhood_plus_magnitude",
                  "efficacy_margin", "ngram_entropy", "reference_score",
                  "neighborhood_kl", "neighborhood_plus_kl",
                  *(f"gen_{g}_{m}" for g in answers.GROUPS for m in ("em", "f1"))]


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means (in percent for *_success and *_magnitude) over records, plus the harmonic-mean
    Score. ``ngram_entropy`` is in bits and ``reference_score`` a cosine in [0, 1] (ROME's tables
    show both times 100); they appear only when generation was on."""
    out = metrics.field_means(records, SUMMARY_FIELDS,
                              lambda f: f.endswith(("_success", "_magnitude", "_em", "_f1")))
    if all(k in out for k in ("efficacy_success", "paraphrase_success", "neighborhood_success")):
        out["score"] = metrics.harmonic_mean(
            [out["efficacy_success"], out["paraphrase_success"], out["neighborhood_success"]])
    out.update(metrics.diagnostic_means(records))
    return out
