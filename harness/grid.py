"""Grid files: the schema of ``harness/grids/*.yaml`` and their loading and checking.

A grid file holds one grid (a mapping) or several (a list of mappings, run as their union, e.g.
more seeds for some methods than for others). Each mapping has

* the four axes, lists; every combination is one run: ``models``, ``methods``, ``suites``
  (required) and ``seeds`` (default ``[0]``);
* any ``keh run`` option, spelled as on the command line with underscores for dashes
  (``n_edits``, ``batch_size``, ``sequential``, ``answer_tokens``, ``dtype``, ...) and with
  ``keh run``'s default when left out; ``hparams`` and ``set`` take one entry per method
  (``hparams: {rome: my.yaml}``, ``set: {rome: {layers: [5]}}``), since a grid holds several;
* ``out`` (where the run directories go, default ``runs/benchmark``) and ``report_dir``
  (default ``reports_out/benchmark``): the benchmark builds one report per ``report_dir``
  from the runs of the mappings that name it (a report never mixes designs; with
  ``--report-dir DIR``, in DIR, or in a folder of each one's name under DIR where they
  differ: :func:`harness.benchmark.report_folders`);
* ``study``: the part of a claims study these runs are (``single``, ``pairs`` or
  ``sequential``, :mod:`reports.study`); the benchmark then also writes the study's
  verdicts, over all its parts, to ``study.md`` in the parent folder of the first part's
  ``report_dir``.

Older spellings are accepted: ``out_dir`` for ``out`` and ``hparams_overrides`` for ``set``
(the manifest records both under their run-config names, ``out_dir`` and
``hparams_overrides``). Unknown or missing keys, values of the wrong type and every cell's
``RunConfig.validate()`` are checked before anything runs, each problem in one line.
"""

from __future__ import annotations

import itertools
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from harness.config import RunConfig
from harness.errors import UserError
from harness.yamlio import safe_load

GRIDS = Path(__file__).parent / "grids"
_RUN = RunConfig()
#: old key -> key
ALIASES = {"out_dir": "out", "hparams_overrides": "set"}
#: RunConfig fields a grid sets through an axis or not at all (one run id per cell)
AXES = {"model": "models", "method": "methods", "suite": "suites", "seed": "seeds"}
NOT_IN_GRIDS = ("run_id",)


@dataclass
class Grid:
    """One grid mapping (see the module docstring for the schema)."""

    models: list[str]
    methods: list[str]
    suites: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    n_edits: int = _RUN.n_edits
    batch_size: int = _RUN.batch_size
    sequential: bool = _RUN.sequential
    start: int = _RUN.start
    data: str | None = _RUN.data
    data_dir: str | None = _RUN.data_dir
    eval_every: int = _RUN.eval_every
    downstream: list[str] = field(default_factory=list)
    downstream_limit: int = _RUN.downstream_limit
    downstream_fewshot: int = _RUN.downstream_fewshot
    generation_tokens: int = _RUN.generation_tokens
    answer_tokens: int = _RUN.answer_tokens
    fluency_decoding: str = _RUN.fluency_decoding
    zsre_target: str = _RUN.zsre_target
    eval_batch_size: int = _RUN.eval_batch_size
    device: str = _RUN.device
    dtype: str = _RUN.dtype
    preset: str = _RUN.preset
    hparams: dict[str, str] = field(default_factory=dict)
    set: dict[str, dict[str, Any]] = field(default_factory=dict)
    trust_remote_code: bool = _RUN.trust_remote_code
    stop_on_error: bool = _RUN.stop_on_error
    out: str = "runs/benchmark"
    report_dir: str = "reports_out/benchmark"
    study: str | None = None

    def configs(self) -> list[RunConfig]:
        """One run config per (model, suite, method, seed), in that nesting order."""
        shared = {f.name: getattr(self, f.name) for f in fields(RunConfig)
                  if f.name in GRID_RUN_KEYS}
        out = []
        for model, suite, method, seed in itertools.product(self.models, self.suites,
                                                           self.methods, self.seeds):
            out.append(RunConfig(
                **{k: list(v) if isinstance(v, list) else v for k, v in shared.items()},
                model=model, method=method, suite=suite, seed=seed, out_dir=self.out,
                hparams=self.hparams.get(method),
                hparams_overrides=dict(self.set.get(method, {}))))
        return out


#: RunConfig fields a grid key of the same name sets for every cell
GRID_RUN_KEYS = tuple(f.name for f in fields(RunConfig)
                      if f.name not in (*AXES, *NOT_IN_GRIDS, "out_dir", "hparams",
                                        "hparams_overrides"))


def grid_path(name_or_path: str) -> Path:
    """A YAML path, or the shipped grid of that name; one line naming the known ones if
    neither exists."""
    path = Path(name_or_path)
    is_path = "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    if not (is_path and path.is_file()):
        path = GRIDS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRIDS.glob("*.yaml")))
        raise UserError(f"no grid {name_or_path!r} (known: {known}; or give a YAML path)")
    return path


def load_grid(name_or_path: str) -> list[Grid]:
    """The grids of a grid file, every cell checked (one line per problem)."""
    path = grid_path(name_or_path)
    try:
        data = safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"grid {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    parts = data if isinstance(data, list) else [data]
    grids = []
    for i, part in enumerate(parts):
        where = f"grid {path}" + (f", part {i + 1} of {len(parts)}" if len(parts) > 1 else "")
        grid = Grid(**_check_part(part, where))
        for cfg in grid.configs():
            try:
                cfg.validate()
            except UserError as exc:
                raise UserError(f"{where} ({cfg.method} / {cfg.suite} / seed {cfg.seed}): "
                                f"{exc}") from exc
        if grid.study is not None:
            from reports.study import PARTS

            if grid.study not in PARTS:
                raise UserError(f"{where}: study: expected one of {', '.join(PARTS)}, got "
                                f"{grid.study!r}")
        unknown = sorted((set(grid.hparams) | set(grid.set)) - set(grid.methods))
        if unknown:
            raise UserError(f"{where}: hparams/set name method(s) {', '.join(unknown)} that "
                            f"are not in its methods")
        grids.append(grid)
    return grids


def _kind_ok(value: Any, kind: Any) -> bool:
    """Whether a YAML value fits a field annotation of :class:`Grid` (bool is not an int)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is list:
        return isinstance(value, list) and all(_kind_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _kind_ok(k, args[0]) and _kind_ok(v, args[1]) for k, v in value.items())
    if args:  # a union such as str | None
        return any(_kind_ok(value, a) for a in args)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_part(part: Any, where: str) -> dict[str, Any]:
    """The grid entry with old key names replaced; one line for an entry that is not a
    mapping, has unknown, doubled or missing keys, or a value of the wrong type (e.g.
    ``n_edits: ten``, ``methods: rome`` for a list)."""
    if not isinstance(part, dict):
        raise UserError(f"{where}: expected a mapping of grid keys, got {type(part).__name__}")
    hints = get_type_hints(Grid)  # field name -> annotation, in field order
    both = [f"{old} and {new}" for old, new in ALIASES.items() if old in part and new in part]
    if both:
        raise UserError(f"{where}: {both[0]} name the same setting; keep {both[0].split()[-1]}")
    written = {ALIASES.get(k, k): k for k in part}  # for messages: the key as written
    part = {ALIASES.get(k, k): v for k, v in part.items()}
    unknown = [k for k in part if k not in hints]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                        f"(known: {', '.join(hints)})")
    missing = [f.name for f in fields(Grid) if f.name not in part
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    for key, value in part.items():
        if not _kind_ok(value, hints[key]):
            kind = hints[key]
            shown = (str(kind) if get_origin(kind) else kind.__name__).replace("typing.", "")
            raise UserError(f"{where}: {written[key]}: expected {shown}, got {value!r}")
    empty = [axis for axis in AXES.values() if axis in part and not part[axis]]
    if empty:
        raise UserError(f"{where}: {', '.join(empty)} empty: name at least one")
    return part
