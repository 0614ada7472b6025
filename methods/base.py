"""What every editing method shares: the request, the outcome, hparams loading, the protocol."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from harness.errors import UserError
from harness.yamlio import safe_load

HPARAMS_DIR = Path(__file__).parent / "hparams"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` is a template with one ``{}`` where the subject goes. The evaluation prompts
    (full strings, subject already filled in) come from the suite:
    ``paraphrase_prompts`` should now yield ``target_new``; ``neighborhood_prompts`` are about
    other subjects and should keep yielding ``neighborhood_target`` (CounterFact: the true object).
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str = ""
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)


@dataclass
class EditOutcome:
    """What a method returns for one batch.

    ``diagnostics`` has one dict per request (same order): e.g. phi, rho, z_error,
    residual_norm, update_norm. ``state`` is the solver state carried to the next batch in
    sequential editing (tensors only, so it can be checkpointed as safetensors).
    """

    diagnostics: list[dict[str, Any]]
    state: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


class Method(Protocol):
    """An editing method: a module exposing ``NAME``, ``Hparams`` and ``edit``."""

    NAME: str

    def edit(self, lm: Any, requests: list[EditRequest], hparams: Any,
             state: dict[str, Any]) -> EditOutcome: ...


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        out = [_coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError:
                continue
        raise UserError(f"{where}: {value!r} does not match {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric hyperparameter: ``lo <= x <= hi`` (``<`` where open)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def describe(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


POSITIVE = Range(0.0, lo_open=True)
NON_NEGATIVE = Range(0.0)
AT_LEAST_ONE = Range(1.0)

#: allowed range of a hyperparameter by field name, for every method (list fields: each
#: element). Every float field must also be finite. A new field is covered by adding a line.
RANGES: dict[str, Range] = {
    # target vector v (methods/targets.py)
    "v_lr": POSITIVE, "v_num_grad_steps": AT_LEAST_ONE, "v_steps": AT_LEAST_ONE,
    "v_weight_decay": NON_NEGATIVE, "kl_factor": NON_NEGATIVE, "clamp_norm_factor": POSITIVE,
    "stop_loss": NON_NEGATIVE,
    # locate-then-edit (methods/locate.py)
    "layers": NON_NEGATIVE, "n_context": NON_NEGATIVE, "context_length": AT_LEAST_ONE,
    "context_templates": NON_NEGATIVE, "stats_tokens": Range(1000.0),
    "stats_seq_len": Range(2.0), "stats_records": AT_LEAST_ONE,
    "nullspace_threshold": NON_NEGATIVE, "L2": NON_NEGATIVE,
    "mom2_update_weight": NON_NEGATIVE,
    # MetaKE (methods/metake.py), rescaled AlphaEdit
    "outer_steps": NON_NEGATIVE, "outer_lr": POSITIVE, "beta": NON_NEGATIVE,
    "gamma": NON_NEGATIVE, "outer_clamp_factor": POSITIVE, "proxy_layer": NON_NEGATIVE,
    "max_rescale": POSITIVE,
    # ENCORE, NSE, NAMET, UltraEdit (methods/encore.py, nse.py, namet.py, ultraedit.py)
    "mpes_patience": NON_NEGATIVE, "update_norm_lambda": NON_NEGATIVE,
    "nse_alpha": NON_NEGATIVE, "nse_upper_bound": POSITIVE, "nse_max_iterations": AT_LEAST_ONE,
    "neuron_threshold": Range(0.0, 1.0, lo_open=True),
    "template_temperature": POSITIVE, "template_top_k": AT_LEAST_ONE,
    "template_top_p": Range(0.0, 1.0, lo_open=True), "template_tokens": AT_LEAST_ONE,
    "chunk_size": AT_LEAST_ONE, "ridge": POSITIVE,
    # fine-tuning (methods/ft.py)
    "lr": POSITIVE, "steps": AT_LEAST_ONE, "norm_constraint": POSITIVE,
    "weight_decay": NON_NEGATIVE, "early_stop_nll": NON_NEGATIVE,
}


def _numbers(value: Any) -> list[int | float]:
    """The numbers in a (nested list) hyperparameter value; booleans are not numbers."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _numbers(v)]
    return []


def check_ranges(hparams: Any, source: str = "hparams") -> None:
    """Every number in ``hparams`` is finite and every field of :data:`RANGES` in its range;
    a one-line :class:`UserError` names the field, its value and the allowed range."""
    for f in dataclasses.fields(hparams):
        value = getattr(hparams, f.name)
        allowed = RANGES.get(f.name)
        for x in _numbers(value):
            if isinstance(x, float) and not math.isfinite(x):
                want = f"a finite number {allowed.describe()}" if allowed else "a finite number"
                raise UserError(f"{source}: field {f.name!r} = {x}: must be {want}")
            if allowed is not None and not allowed.contains(x):
                shown = value if isinstance(value, list | tuple) else x
                raise UserError(f"{source}: field {f.name!r} = {shown!r}: must be "
                                f"{allowed.describe()}")


def with_defaults(cls: type, recorded: dict[str, Any]) -> dict[str, Any]:
    """A manifest's ``recorded`` hparams plus every field of ``cls`` they lack, at its default
    (as JSON values). A field added after a run was made defaults to the behaviour the run
    had (UltraEdit's ``edit_modules``: ``[]``, the rewrite matrices of ``layers``), so the run
    is the same setting as one made now with that default."""
    out = dict(recorded)
    for f in dataclasses.fields(cls):
        if f.name in out:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def hparams_from_dict(cls: type, data: dict[str, Any], source: str = "hparams") -> Any:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of hyperparameters, got {type(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"{source}: unknown hyperparameter(s) {', '.join(unknown)} for {cls.__name__} "
            f"(known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{source}: field {k!r}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{source}: {exc}") from exc
    check_ranges(obj, source)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


PRESETS = ("faithful", "tuned")
#: methods with one setting only: the preset does not apply to them (any other method without
#: a file of the asked preset is an error, so that no table labels faithful numbers "tuned")
SINGLE_SETTING = ("noop", "ft")


def load_hparams(cls: type, method: str, model: str, path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None,
                 preset: str = "faithful") -> tuple[Any, str]:
    """Hparams for ``method`` on ``model``: an explicit YAML ``path``, else the preset's file
    in ``methods/hparams/<method>/``: ``<model>.yaml`` (``faithful``: the published code's
    behaviour) or ``<model>-tuned.yaml`` (``tuned``: this harness's improved settings), with
    ``<model>`` the model name (``/`` and ``:`` as ``_``) or its family (``gpt2-xl`` for
    ``openai-community/gpt2-xl`` or ``random:gpt2-xl``; :func:`harness.models.model_family`);
    else ``default.yaml``, else the dataclass defaults (an error for a real published model,
    whose defaults would be no published setting); then ``overrides``. A method with
    no tuned file for this model is an error under ``tuned``, except the one-setting methods
    :data:`SINGLE_SETTING` (ft, noop), which use their files under either preset.
    Returns (hparams, source)."""
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    data: dict[str, Any] = {}
    source = "dataclass defaults"
    if path is None:
        from harness.models import model_family

        suffix = "" if preset == "faithful" else f"-{preset}"
        family = model_family(model)
        stems = [model.replace("/", "_").replace(":", "_"), family]
        cands = [HPARAMS_DIR / method / f"{st}{suffix}.yaml" for st in stems if st]
        presetless = preset != "faithful" and method in SINGLE_SETTING
        if presetless:  # a method with one setting only (ft, noop): the preset does not apply
            suffix = ""
            cands = [HPARAMS_DIR / method / f"{st}.yaml" for st in stems if st]
        if preset == "faithful" or presetless:
            cands.append(HPARAMS_DIR / method / "default.yaml")
        path = next((cand for cand in cands if cand.exists()), None)
        if path is None:
            have = ", ".join(sorted(p.stem.removesuffix(suffix) for p in
                                    (HPARAMS_DIR / method).glob(f"*{suffix}.yaml"))) or "none"
            if preset != "faithful" and not presetless:
                raise UserError(f"--preset {preset}: method {method!r} has no {preset} hparams "
                                f"for model {model!r} (it has: {have})")
            if family and not model.startswith("random:") and method != "noop":
                # the dataclass defaults are no published setting of a real published model
                raise UserError(f"method {method!r} ships no hparams for the published model "
                                f"{family!r} (methods/hparams/{method}/ has: {have}): pass "
                                f"--hparams FILE with the setting to run")
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"hparams file {p} does not exist")
        try:
            loaded = safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"hparams file {p}: not valid YAML ({exc})") from exc
        data.update(loaded)
        source = str(p)
    if overrides:
        data.update(overrides)
        source += f" + overrides {sorted(overrides)}"
    return hparams_from_dict(cls, data, source), source
