"""What every editing method shares: the request, the outcome, hparams loading, the protocol."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from harness.errors import UserError

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
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def load_hparams(cls: type, method: str, model: str, path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Hparams for ``method`` on ``model``: an explicit YAML ``path``, else
    ``methods/hparams/<method>/<model>.yaml``, else the file of its family (``gpt2-xl.yaml``
    for ``openai-community/gpt2-xl`` or ``random:gpt2-xl``; :func:`harness.models.model_family`),
    else ``default.yaml`` there, else the dataclass defaults; then ``overrides``.
    Returns (hparams, source description)."""
    data: dict[str, Any] = {}
    source = "dataclass defaults"
    if path is None:
        from harness.models import model_family

        stems = [model.replace("/", "_").replace(":", "_"), model_family(model)]
        for cand in [*(HPARAMS_DIR / method / f"{st}.yaml" for st in stems if st),
                     HPARAMS_DIR / method / "default.yaml"]:
            if cand.exists():
                path = cand
                break
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"hparams file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"hparams file {p}: not valid YAML ({exc})") from exc
        data.update(loaded)
        source = str(p)
    if overrides:
        data.update(overrides)
        source += f" + overrides {sorted(overrides)}"
    return hparams_from_dict(cls, data, source), source
