"""``nox -s benchmark``: run a declared grid of runs, skip the complete ones, then summarise.

A grid is a YAML file (``harness/grids/<name>.yaml`` or any path) with lists ``models``,
``methods``, ``suites``, ``seeds`` and scalars ``n_edits``, ``batch_size``, ``sequential``,
``out_dir``, ``report_dir`` (and optional ``hparams_overrides`` per method).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import UserError

GRIDS = Path(__file__).parent / "grids"


@dataclass
class Grid:
    models: list[str]
    methods: list[str]
    suites: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    n_edits: int = 20
    batch_size: int = 10
    sequential: bool = True
    start: int = 0
    eval_every: int = 0
    downstream: list[str] = field(default_factory=list)
    downstream_limit: int = 200
    out_dir: str = "runs/benchmark"
    report_dir: str = "reports_out/benchmark"
    device: str = "auto"
    dtype: str = "float32"
    hparams_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def configs(self) -> list[RunConfig]:
        out = []
        for model, suite, method, seed in itertools.product(self.models, self.suites,
                                                           self.methods, self.seeds):
            out.append(RunConfig(
                model=model, method=method, suite=suite, seed=seed, n_edits=self.n_edits,
                batch_size=self.batch_size, sequential=self.sequential, start=self.start,
                eval_every=self.eval_every, downstream=list(self.downstream),
                downstream_limit=self.downstream_limit, out_dir=self.out_dir,
                device=self.device, dtype=self.dtype,
                hparams_overrides=dict(self.hparams_overrides.get(method, {}))))
        return out


def load_grid(name_or_path: str) -> list[Grid]:
    """A grid file holds one grid (a mapping) or several (a list of mappings: their union,
    e.g. more seeds for some methods than for others)."""
    path = Path(name_or_path)
    if not path.exists():
        path = GRIDS / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in GRIDS.glob("*.yaml"))
        raise UserError(f"no grid {name_or_path!r} (known: {known}; or give a YAML path)")
    data = yaml.safe_load(path.read_text()) or {}
    parts = data if isinstance(data, list) else [data]
    try:
        return [Grid(**part) for part in parts]
    except TypeError as exc:
        raise UserError(f"grid {path}: {exc}") from exc


def is_complete(run_dir: Path) -> bool:
    m = run_dir / rec_io.MANIFEST
    return m.exists() and json.loads(m.read_text()).get("status") == "complete"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.benchmark")
    ap.add_argument("--grid", default="default")
    ap.add_argument("--out", default=None, help="override the grid's out_dir")
    ap.add_argument("--report-dir", default=None, help="override the grid's report_dir")
    ap.add_argument("--no-report", action="store_true", help="only run the grid")
    args = ap.parse_args(argv)
    from harness.models import load_model
    from harness.runner import run

    try:
        grids = load_grid(args.grid)
        configs = []
        for grid in grids:
            if args.out:
                grid.out_dir = args.out
            configs += [c for c in grid.configs() if c not in configs]
        loaded: dict[str, Any] = {}
        run_dirs = []
        for i, cfg in enumerate(configs):
            run_dir = Path(cfg.out_dir) / cfg.default_run_id()
            run_dirs.append(run_dir)
            if is_complete(run_dir):
                print(f"[{i + 1}/{len(configs)}] skip (complete): {run_dir}")
                continue
            if run_dir.exists():
                print(f"[{i + 1}/{len(configs)}] incomplete run {run_dir} is started again")
                shutil.rmtree(run_dir)
            print(f"[{i + 1}/{len(configs)}] {cfg.method} / {cfg.suite} / {cfg.model} "
                  f"/ seed {cfg.seed}")
            key = f"{cfg.model}|{cfg.device}|{cfg.dtype}|{cfg.seed}"
            if key not in loaded:
                loaded.clear()
                loaded[key] = load_model(cfg.model, cfg.device, cfg.dtype, seed=cfg.seed)
            lm = loaded[key]
            run(cfg, lm=lm)  # restores the weights it edited
        print_table(run_dirs)
        if not args.no_report:
            from reports.build import build_report

            index = build_report(run_dirs, Path(args.report_dir or grids[0].report_dir))
            print(f"report: {index}")
    except UserError as exc:
        print(f"keh: error: {exc}", file=sys.stderr)
        return 2
    return 0


def print_table(run_dirs: list[Path]) -> None:
    import pandas as pd

    rows = []
    for d in run_dirs:
        m = json.loads((d / rec_io.MANIFEST).read_text())
        rows.append({"suite": m["config"]["suite"], "method": m["method"],
                     "model": m["config"]["model"], "seed": m["seed"], **m.get("summary", {}),
                     "time_per_edit_s": m.get("timings", {}).get("time_per_edit_s")})
    frame = pd.DataFrame(rows)
    try:
        print(frame.to_markdown(index=False, floatfmt=".2f"))
    except ImportError:  # tabulate missing
        print(frame.to_string(index=False, float_format="%.2f"))


if __name__ == "__main__":
    sys.exit(main())
