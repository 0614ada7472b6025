"""Run configuration: one dataclass, validated before any model is loaded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from harness.errors import UserError

#: allowed values of RunConfig.zsre_target / fluency_decoding (first: default; the suites
#: define them: suites.zsre.TARGETS, suites.fluency.DECODINGS)
ZSRE_TARGETS = ("answers0", "alt")
FLUENCY_DECODINGS = ("sample_top5_100", "greedy")


@dataclass
class RunConfig:
    """Everything that determines a run's numbers (and a few things that only say where).

    ``sequential``: edits accumulate across batches (no restore) and every case is evaluated
    after the last batch; otherwise the weights are restored after each batch, which is
    evaluated right after its own edit (batch editing). ``eval_every``: in sequential runs,
    also evaluate downstream tasks and the probe set every K batches (0: only at the end).
    ``downstream``: lm-eval task names (keh's offline ``sst2, mrpc, cola, rte, nli, mmlu`` or
    built-in ones) evaluated before the first edit and after the last batch, on at most
    ``downstream_limit`` examples each (0: all) with ``downstream_fewshot`` shots.
    ``answer_tokens``: generation-based evaluation (:mod:`suites.answers`): greedy answers of at
    most this many new tokens from the rewrite, paraphrase and neighbourhood prompts, exact match
    and token F1 in every record (0: off; ``--no-generation-eval``).
    ``generation_tokens``: greedy tokens generated per prompt for the fluency/consistency metrics
    of suites that have them (0: off). ``stop_on_error``: stop the run when a method fails on
    a batch (numerical error, non-finite diagnostics) instead of recording that batch's cases
    as failed and going on. ``preset``: which hparams file a method gets when ``hparams`` is
    not given: ``faithful`` (the published code's behaviour) or ``tuned`` (this harness's
    improved settings, ``<model>-tuned.yaml``; methods/hparams/README.md).
    ``zsre_target``: zsRE's ``target_new``, ``answers0`` (the ROME/MEMIT/AlphaEdit code and
    tables) or ``alt`` (EasyEdit). ``fluency_decoding``: ``sample_top5_100`` (the original's
    top-5 sampling to 100 tokens in total, seeded per case) or ``greedy``
    (``generation_tokens`` new tokens); :mod:`suites.fluency`.
    """

    model: str = "smollm2-135m"
    method: str = "noop"
    suite: str = "counterfact"
    n_edits: int = 10
    batch_size: int = 1
    sequential: bool = False
    eval_every: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    data_dir: str | None = None
    data: str | None = None
    out_dir: str = "runs"
    hparams: str | None = None
    hparams_overrides: dict[str, Any] = field(default_factory=dict)
    preset: str = "faithful"
    zsre_target: str = "answers0"
    fluency_decoding: str = "sample_top5_100"
    eval_batch_size: int = 32
    start: int = 0
    run_id: str | None = None
    downstream: list[str] = field(default_factory=list)
    downstream_limit: int = 200
    downstream_fewshot: int = 0
    generation_tokens: int = 0
    answer_tokens: int = 16
    trust_remote_code: bool = False
    stop_on_error: bool = False

    # fields that say where things go, not what is computed: left out of the identity hash
    _LOCATION_FIELDS = ("out_dir", "run_id", "data_dir", "device")
    # fields that say what to do when something goes wrong, not what a record holds: left out too
    _BEHAVIOUR_FIELDS = ("stop_on_error",)

    def validate(self) -> None:
        if self.n_edits < 1:
            raise UserError(f"--n-edits must be at least 1 (got {self.n_edits})")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0 (got {self.eval_every})")
        if self.eval_every > 0 and not self.sequential:
            raise UserError(f"--eval-every {self.eval_every} needs --sequential: it draws a curve "
                            f"of the edits accumulated so far, and batch runs restore the weights "
                            f"after each batch (with --downstream a batch run already scores "
                            f"before the first and after the last batch)")
        if self.start < 0:
            raise UserError(f"--start must be >= 0 (got {self.start})")
        if self.eval_batch_size < 1:
            raise UserError("--eval-batch-size must be at least 1")
        if self.generation_tokens < 0:
            raise UserError(f"--generation-tokens must be >= 0 (got {self.generation_tokens})")
        if self.answer_tokens < 0:
            raise UserError(f"--answer-tokens must be >= 0 (got {self.answer_tokens})")
        if self.downstream_limit < 0:
            raise UserError(f"--downstream-limit must be >= 0 (got {self.downstream_limit})")
        if self.downstream_fewshot < 0:
            raise UserError(f"--downstream-fewshot must be >= 0 (got {self.downstream_fewshot})")
        if self.zsre_target not in ZSRE_TARGETS:
            raise UserError(f"--zsre-target must be one of {', '.join(ZSRE_TARGETS)} "
                            f"(got {self.zsre_target!r})")
        if self.fluency_decoding not in FLUENCY_DECODINGS:
            raise UserError(f"--fluency-decoding must be one of {', '.join(FLUENCY_DECODINGS)} "
                            f"(got {self.fluency_decoding!r})")
        if self.preset not in ("faithful", "tuned"):
            raise UserError(f"--preset must be one of faithful, tuned (got {self.preset!r})")
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.run_id):
            raise UserError(f"--run-id {self.run_id!r} may only hold letters, digits, . _ -")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the numbers (location fields removed)."""
        d = self.to_dict()
        for k in (*self._LOCATION_FIELDS, *self._BEHAVIOUR_FIELDS):
            d.pop(k, None)
        return d

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def default_run_id(self) -> str:
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model)
        mode = "seq" if self.sequential else "batch"
        return (f"{self.suite}_{self.method}_{model}_n{self.n_edits}_b{self.batch_size}_{mode}"
                f"_s{self.seed}_{self.identity_hash()}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown run config field(s): {', '.join(unknown)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg
