"""Intention to treat: the one rule for scoring failed edits, used by the run summary
(:mod:`harness.runner`) and the report (:mod:`reports.load`). No heavy imports."""

from __future__ import annotations

from collections.abc import Sequence

#: success rates of the edit itself (CounterFact, zsRE, generation-based): a failed edit
#: scores 0 in each, whatever the model it left would say (intention to treat)
EDIT_SUCCESS_RATES = ("efficacy_success", "paraphrase_success", "efficacy_accuracy",
                      "paraphrase_accuracy", "gen_efficacy_em", "gen_efficacy_f1",
                      "gen_paraphrase_em", "gen_paraphrase_f1")


def intention_to_treat(records: Sequence[dict]) -> list[dict]:
    """Records scored by intention to treat: a failed edit (``failed: true``) is a failure,
    0 in each of :data:`EDIT_SUCCESS_RATES` that any record has; every other outcome keeps
    the value measured on the model the failure left (batch mode: the unedited model;
    sequential: the final model), so no mean drops a case because its edit failed. Failed
    records are copied, the others returned as they are."""
    rates = [f for f in EDIT_SUCCESS_RATES if any(f in r for r in records)]
    return [dict(r, **dict.fromkeys(rates, 0.0)) if r.get("failed") else r for r in records]
