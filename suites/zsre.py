"""zsRE question answering edits (Levy et al., CoNLL 2017) in MEND's format, with the token-level
accuracy evaluation of MEND (Mitchell et al., ICLR 2022) as used by ROME/MEMIT (Meng et al.,
NeurIPS 2022; ICLR 2023).

Record format (``zsre_mend_eval.json`` of the ROME/MEMIT data site, and the 1k MEND subset shipped
with the project): ``{subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond}``.

Request built from a record:

* ``prompt`` = ``src`` with the subject replaced by ``{}``; the answer follows the question
  after a space (:func:`harness.scoring.encode_pair`), e.g. ``"What is the product made by
  UniFirst? unmanned aircraft"``.
* ``target_new`` by the ``target`` option (:data:`TARGETS`, recorded in the manifest as the
  run config's ``zsre_target``):

  - ``answers0`` (default): ``answers[0]``, as the ROME/MEMIT/AlphaEdit code
    (``dsets/zsre.py``: ``target_new = answers[0]``) that produced the papers' zsRE tables;
    their evaluation (``eval_utils_zsre.py``) scores the rewrite and paraphrase prompts against
    that same target and the neighbourhood against ``loc_ans``, as here. The original sets no
    meaningful ``target_true`` (``"<|endoftext|>"``); here it is ``pred`` (the MEND base
    model's answer, the left side of the record's ``cond``), which only the
    ``efficacy_margin`` uses; 571 of the 1000 MEND records have ``pred == answers[0]`` (the
    records say ``target_new_equals_true``). No record is skipped.
  - ``alt``: ``alt`` (EasyEdit's counterfactual convention), ``target_true`` =
    ``answers[0]``. 17 of the 1000 MEND records have ``alt == answers[0]``; they are kept
    (``target_new_equals_true``). Records whose ``alt`` is an empty string (2 of the 1000:
    MEND found no alternative answer) have nothing to edit towards and are skipped, as
    EasyEdit's loader does.

  ``case_id`` is the record's index in the file, so skipping shifts no ids.
* ``paraphrase_prompts`` = ``(rephrase,)``.
* ``neighborhood_prompts`` = ``(loc + "?",)`` with ``neighborhood_target`` = ``loc_ans`` (MEMIT
  appends ``"?"`` to the Natural Questions prompt ``"nq question: ..."``).

Metrics (all teacher-forced: the prefix of the target is given, the argmax at each position is
compared with the next target token):

* ``efficacy_accuracy``: mean over the tokens of ``target_new`` after the rewrite prompt of
  1{argmax = token} (MEND's/MEMIT's "Efficacy"); ``efficacy_success``: 1 if every token is hit.
* ``paraphrase_accuracy`` / ``paraphrase_success``: the same on the rephrased question
  ("Generalization").
* ``specificity_accuracy``: token accuracy on ``loc_ans`` after ``loc?`` (MEMIT's "Specificity").
* ``specificity_unedited_agreement``: fraction of those positions where the edited model's argmax
  equals the unedited model's argmax (drift from the model's own predictions, the locality of
  EasyEdit); needs :func:`reference` computed before any edit.
* ``efficacy_margin``: mean log p(target_new) - mean log p(target_true) on the rewrite prompt.

Generation-based (with ``answer_tokens > 0``; :mod:`suites.answers`): greedy answers to the
question, its rephrasing (against ``target_new``) and the NQ question (against ``loc_ans``),
exact match and token F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from harness.errors import DataError, UserError
from harness.scoring import score_targets
from methods.base import EditRequest
from suites import answers, metrics
from suites.counterfact import template_from_prompt
from suites.data import read_json_records, require_str

NAME = "zsre"
#: values of the ``target`` option (``RunConfig.zsre_target``); the first is the default
TARGETS = ("answers0", "alt")
#: ``load`` keyword -> RunConfig field, for :func:`suites.load_kwargs`
LOAD_OPTIONS = {"target": "zsre_target"}
DEFAULT_FILES = ["zsre/zsre_mend_eval.json", "zsre/zsre-mend-1k.json", "zsre_mend_eval.json"]
CANONICAL_URL = "https://rome.baulab.info/data/dsets/zsre_mend_eval.json"

SUMMARY_FIELDS = ["efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy",
                  "specificity_unedited_agreement", "efficacy_success", "paraphrase_success",
                  "efficacy_margin",
                  *(f"gen_{g}_{m}" for g in answers.GROUPS for m in ("em", "f1"))]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _answers(path: Path, i: int, rec: dict[str, Any]) -> list[str]:
    val = rec.get("answers")
    if val is None:
        raise DataError(path, "missing", i, "answers")
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list) or not val or \
            not all(isinstance(v, str) and v.strip() for v in val):
        raise DataError(path, "expected a non-empty list of non-empty strings", i, "answers")
    return val


def locality_prompt(loc: str) -> str:
    """MEMIT's neighbourhood prompt: the NQ question followed by ``?``."""
    return loc if loc.rstrip().endswith("?") else loc + "?"


def check_target(target: str) -> str:
    """``target`` if it is one of :data:`TARGETS`, else a one-line UserError."""
    if target not in TARGETS:
        raise UserError(f"zsre target {target!r} is not one of {', '.join(TARGETS)} "
                        f"(--zsre-target)")
    return target


def parse_record(path: Path, i: int, rec: dict[str, Any], target: str = "answers0"
                 ) -> EditRequest:
    """One validated :class:`EditRequest` from a MEND-format record (errors name the field);
    ``target`` picks ``target_new`` (see the module docstring)."""
    check_target(target)
    subject = require_str(path, rec, i, "subject")
    src = require_str(path, rec, i, "src")
    answer = _answers(path, i, rec)[0]
    if target == "alt":
        new, true = require_str(path, rec, i, "alt"), answer
    else:
        pred = rec.get("pred")
        fallback = rec.get("alt") if isinstance(rec.get("alt"), str) else None
        true = pred if isinstance(pred, str) and pred.strip() else (fallback or answer)
        new = answer
    rephrase = require_str(path, rec, i, "rephrase")
    loc = require_str(path, rec, i, "loc")
    loc_ans = require_str(path, rec, i, "loc_ans")
    return EditRequest(
        case_id=str(rec.get("case_id", i)),
        prompt=template_from_prompt(path, i, src, subject, "src"),
        subject=subject, target_new=new, target_true=true,
        paraphrase_prompts=(rephrase,),
        neighborhood_prompts=(locality_prompt(loc),),
        neighborhood_target=loc_ans,
        extra={"target_new_equals_true": new.strip() == true.strip(),
               "pred": rec.get("pred")},
    )


def has_empty_alt(rec: dict[str, Any]) -> bool:
    """A record whose ``alt`` is present but an empty string (no edit target)."""
    return isinstance(rec.get("alt"), str) and not rec["alt"].strip()


def load(path: str | Path, skip_empty_alt: bool = True, target: str = "answers0"
         ) -> list[EditRequest]:
    """Validated requests from a MEND-format zsRE file (JSON list or JSON lines), with
    ``target_new`` by ``target`` (:data:`TARGETS`); with ``target="alt"`` records with an
    empty ``alt`` are skipped unless ``skip_empty_alt`` is False (then they are errors)."""
    check_target(target)
    path = Path(path)
    out = []
    seen: set[str] = set()
    for i, rec in enumerate(read_json_records(path)):
        if target == "alt" and skip_empty_alt and has_empty_alt(rec):
            continue
        req = parse_record(path, i, rec, target)
        if req.case_id in seen:
            raise DataError(path, f"duplicate case_id {req.case_id}", i, "case_id")
        seen.add(req.case_id)
        out.append(req)
    return out


# ---------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------


def token_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean of 1{predicted_j = target_j} over the target tokens (MEND/MEMIT token accuracy)."""
    if predicted.shape != target.shape or target.numel() == 0:
        raise ValueError(f"need equal, non-empty shapes, got {predicted.shape}, {target.shape}")
    return float((predicted == target).float().mean())


def all_tokens_correct(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1.0 if every target token is the argmax prediction (exact teacher-forced match)."""
    if predicted.shape != target.shape or target.numel() == 0:
        raise ValueError(f"need equal, non-empty shapes, got {predicted.shape}, {target.shape}")
    return float(bool((predicted == target).all()))


def mean_or_none(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Model passes
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_and_predict(lm, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per pair: log p of each target token, the teacher-forced argmax token ids and the target
    token ids (CPU tensors), from :func:`harness.scoring.score_targets`."""
    scores = score_targets(lm, prompts, targets, batch_size=batch_size)
    return scores.logprobs, scores.predicted, scores.target_ids


def reference(lm, requests: list[EditRequest], batch_size: int = 32) -> list[dict[str, Any]]:
    """Run before any edit: the unedited model's teacher-forced argmax tokens on each
    neighbourhood prompt followed by ``loc_ans``. One dict per request (same order)."""
    prompts = [p for r in requests for p in r.neighborhood_prompts]
    targets = [r.neighborhood_target for r in requests for _ in r.neighborhood_prompts]
    _, predicted, _ = score_and_predict(lm, prompts, targets, batch_size)
    out, k = [], 0
    for r in requests:
        n = len(r.neighborhood_prompts)
        out.append({"case_id": r.case_id,
                    "neighborhood_predictions": [p.tolist() for p in predicted[k:k + n]]})
        k += n
    return out


def _layout(requests: list[EditRequest]) -> tuple[list[str], list[str],
                                                    list[dict[str, tuple[int, int]]]]:
    """All (prompt, target) pairs of all requests and, per request, where each group lies."""
    prompts: list[str] = []
    targets: list[str] = []
    layout = []
    for r in requests:
        groups: dict[str, tuple[int, int]] = {}
        for group, pairs in (
            ("rewrite_new", [(r.rewrite_prompt, r.target_new)]),
            ("rewrite_true", [(r.rewrite_prompt, r.target_true)]),
            ("paraphrase", [(p, r.target_new) for p in r.paraphrase_prompts]),
            ("neighborhood", [(p, r.neighborhood_target) for p in r.neighborhood_prompts]),
        ):
            start = len(prompts)
            for p, t in pairs:
                prompts.append(p)
                targets.append(t)
            groups[group] = (start, len(prompts))
        layout.append(groups)
    return prompts, targets, layout


def evaluate(lm, requests: list[EditRequest], batch_size: int = 32,
             reference: list[dict[str, Any]] | None = None, answer_tokens: int = 0
             ) -> list[dict[str, Any]]:
    """One record per request (see the module docstring for the fields); ``reference`` is the
    slice of :func:`reference`'s output for these requests (same order), or None; with
    ``answer_tokens > 0`` also the generation-based fields."""
    if reference is not None and len(reference) != len(requests):
        raise ValueError("reference must have one entry per request")
    prompts, targets, layout = _layout(requests)
    lps, preds, tids = score_and_predict(lm, prompts, targets, batch_size)
    records = []
    for n, (r, g) in enumerate(zip(requests, layout, strict=True)):
        (a_new, _), (a_true, _) = g["rewrite_new"], g["rewrite_true"]
        para = range(*g["paraphrase"])
        neigh = range(*g["neighborhood"])
        lp_new, lp_true = lps[a_new].mean(), lps[a_true].mean()
        rec: dict[str, Any] = {
            "case_id": r.case_id,
            "efficacy_accuracy": token_accuracy(preds[a_new], tids[a_new]),
            "efficacy_success": all_tokens_correct(preds[a_new], tids[a_new]),
            "paraphrase_accuracy": mean_or_none([token_accuracy(preds[j], tids[j])
                                                 for j in para]),
            "paraphrase_success": mean_or_none([all_tokens_correct(preds[j], tids[j])
                                                for j in para]),
            "specificity_accuracy": mean_or_none([token_accuracy(preds[j], tids[j])
                                                  for j in neigh]),
            "specificity_unedited_agreement": None,
            "efficacy_margin": float(metrics.margin(lp_new, lp_true)),
            "logprob_new": float(lp_new),
            "logprob_true": float(lp_true),
            "target_new_equals_true": r.target_new.strip() == r.target_true.strip(),
        }
        if reference is not None:
            ref = reference[n]
            if ref.get("case_id") != r.case_id:
                raise ValueError(f"reference for case {ref.get('case_id')} given for case "
                                 f"{r.case_id}")
            ref_pred = [torch.tensor(p, dtype=torch.long)
                        for p in ref["neighborhood_predictions"]]
            rec["specificity_unedited_agreement"] = mean_or_none(
                [token_accuracy(preds[j], rp) for j, rp in zip(neigh, ref_pred, strict=True)])
        rec["logprobs"] = {
            "rewrite": {"new": lps[a_new].tolist(), "true": lps[a_true].tolist()},
            "paraphrase": {"new": [lps[j].tolist() for j in para]},
            "neighborhood": {"true": [lps[j].tolist() for j in neigh]},
        }
        records.append(rec)
    if answer_tokens > 0:
        gens = answers.answer_metrics(lm, answers.request_items(requests), answer_tokens,
                                      batch_size=batch_size)
        for rec, gen in zip(records, gens, strict=True):
            rec.update(gen)
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means over records; accuracies, successes and agreement in percent, margin in nats."""
    out = metrics.field_means(records, SUMMARY_FIELDS, lambda f: f != "efficacy_margin")
    out.update(metrics.diagnostic_means(records))
    return out
