"""Checks of a run's input that do not need the model's weights: paths, devices, hparams
files, layer indices and prompt lengths against the model's config. Each failure is one
:class:`~harness.errors.UserError` line naming what is wrong and what to do; nothing is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError
from harness.yamlio import safe_load

#: hparams fields that hold layer indices (an int, a list of ints, or None)
LAYER_FIELDS = ("layers", "proxy_layer")
#: request fields whose text is fed to the model (with the target appended for scoring)
PROMPT_FIELDS = ("prompt", "paraphrase_prompts", "neighborhood_prompts", "attribute_prompts",
                 "generation_prompts")


def run_directory(out_dir: str, run_id: str) -> Path:
    """``out_dir/run_id``, refused unless it is a direct child of ``out_dir`` and ``out_dir``
    is (or can be created as) a writable directory."""
    if run_id in ("", ".", "..") or "/" in run_id or os.sep in run_id:
        raise UserError(f"--run-id {run_id!r} must name a directory inside --out (letters, "
                        f"digits, . _ -, not '.' or '..')")
    out = Path(out_dir).expanduser()
    run_dir = out / run_id
    if run_dir.resolve().parent != out.resolve():
        raise UserError(f"--run-id {run_id!r}: {run_dir} resolves outside --out {out}")
    check_writable_dir(out, "--out")
    if run_dir.exists() and (run_dir.is_symlink() or not run_dir.is_dir()):
        raise UserError(f"--run-id {run_id!r}: {run_dir} exists and is not a directory; "
                        f"choose another --run-id")
    return run_dir


def check_writable_dir(path: Path, flag: str) -> None:
    """``path`` is a writable directory, or its nearest existing ancestor is one (so that it
    can be created)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe.is_file() else "is not a directory"
        raise UserError(f"{flag} {path}: {probe} {what}; give a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: directory {probe} is not writable; give a "
                        f"directory you can write to")


def check_hparams_file(path: str | Path) -> None:
    """An explicit hparams file is a readable UTF-8 YAML file holding a non-empty mapping."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"hparams file {p} does not exist")
    if not p.is_file():
        raise UserError(f"hparams file {p} is not a file (a directory?); give a YAML file")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"hparams file {p}: cannot read it ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"hparams file {p}: not UTF-8 text (byte {exc.start}); give a YAML "
                        f"file") from exc
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"hparams file {p}: not valid YAML{where}: {problem}") from exc
    if data is None:
        raise UserError(f"hparams file {p} is empty; give a mapping of hyperparameters "
                        f"(field: value)")
    if not isinstance(data, dict):
        raise UserError(f"hparams file {p}: expected a mapping of hyperparameters "
                        f"(field: value), got a {type(data).__name__}")


def _layer_values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def module_layer(name: str) -> int | None:
    """The block index in a full module name (``model.layers.11.mlp.gate_proj`` -> 11,
    ``transformer.h.18.mlp.fc_out`` -> 18), None if it names none."""
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def check_layers(hparams: Any, n_layers: int, model: str) -> None:
    """Every layer index in the hparams (:data:`LAYER_FIELDS`, and the blocks of the modules
    ``edit_modules`` names) lies in ``0..n_layers-1``."""
    for name in LAYER_FIELDS:
        bad = [v for v in _layer_values(getattr(hparams, name, None))
               if not isinstance(v, int) or not 0 <= v < n_layers]
        if bad:
            raise UserError(f"hparams: field {name!r}: layer(s) {bad} outside 0..{n_layers - 1} "
                            f"({model} has {n_layers} layers); set e.g. --set "
                            f"{name}=[{n_layers // 2}]")
    bad_modules = [m for m in getattr(hparams, "edit_modules", None) or []
                   if (i := module_layer(m)) is None or not 0 <= i < n_layers]
    if bad_modules:
        raise UserError(f"hparams: field 'edit_modules': {bad_modules} name no block in "
                        f"0..{n_layers - 1} ({model} has {n_layers} layers; names as "
                        f"model.layers.<i>.mlp.gate_proj)")


def check_lengths(requests: Sequence[Any], tokenizer: Any, n_ctx: int | None, data: Path,
                  start: int, generation_tokens: int = 0, margin: int = 0) -> None:
    """Each prompt of :data:`PROMPT_FIELDS` plus its longest target (and, for generation
    prompts, the generated tokens) fits the model's context of ``n_ctx`` tokens, less
    ``margin`` (context prefixes a method prepends). Names the record, field and lengths."""
    if not n_ctx:
        return
    limit = n_ctx - margin

    def n_tok(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]

    for i, r in enumerate(requests):
        targets = [" " + t for t in (r.target_new, r.target_true, r.neighborhood_target) if t]
        extra = max(n_tok(targets), default=0) if targets else 0
        where: list[tuple[str, str, int]] = []  # (field, text, tokens generated after it)
        for name in PROMPT_FIELDS:
            if name == "prompt":
                where.append(("prompt", r.rewrite_prompt, 0))
                continue
            gen = generation_tokens if name == "generation_prompts" else 0
            where += [(f"{name}[{j}]", text, gen)
                      for j, text in enumerate(getattr(r, name, None) or ())]
        for (field, _, gen), n in zip(where, n_tok([t for _, t, _ in where]), strict=True):
            if n + extra + gen > limit:
                raise UserError(
                    f"{data}, record {start + i} (case {r.case_id}), field {field!r}: "
                    f"{n + extra + gen} tokens with its target, more than the model's context "
                    f"of {limit} tokens; shorten it or leave the record out "
                    f"(--start/--n-edits)")
