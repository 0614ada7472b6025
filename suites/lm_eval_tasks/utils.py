"""Split helpers for keh's offline lm-eval tasks (loaded by lm-eval through ``!function``).

The first :data:`N_FEWSHOT` records of each data file are reserved as few-shot examples (the
convention of the "model editing at scale" downstream evaluation, Gupta et al. 2024); the rest
are evaluated. Both splits read the same file.
"""

from __future__ import annotations

N_FEWSHOT = 10


def fewshot_docs(dataset):
    """The first ``N_FEWSHOT`` records."""
    return dataset.select(range(min(N_FEWSHOT, len(dataset))))


def eval_docs(dataset):
    """Every record after the first ``N_FEWSHOT``."""
    return dataset.select(range(min(N_FEWSHOT, len(dataset)), len(dataset)))
