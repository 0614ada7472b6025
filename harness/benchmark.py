"""``nox -s benchmark``: run a declared grid of runs, skip the complete ones, then summarise.

A grid is a YAML file (``harness/grids/<name>.yaml`` or any path) with lists ``models``,
``methods``, ``suites``, ``seeds`` and scalars ``n_edits``, ``batch_size``, ``sequential``,
``out_dir``, ``report_dir`` (and optional ``data``, a suite file, ``generation_tokens`` for the
fluency texts, and ``hparams_overrides`` per method). ``--jobs N`` runs the grid in N processes
at once (for a GPU that one small model leaves idle); their manifests record
``concurrent_jobs``, since their timings share the device.
``--launcher submitit`` submits the grid as submitit jobs instead (a Slurm job array after
one job that fills the caches; ``--cluster local`` runs the same jobs on this machine):
:mod:`harness.launch`. Either way each run is brought to complete by
:func:`harness.launch.run_cell`, under the run's lock (leave alone when another process holds
it, skip, set aside when stale, resume when killed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import UserError
from harness.yamlio import safe_load

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
    data: str | None = None
    eval_every: int = 0
    downstream: list[str] = field(default_factory=list)
    downstream_limit: int = 200
    generation_tokens: int = 0
    out_dir: str = "runs/benchmark"
    report_dir: str = "reports_out/benchmark"
    device: str = "auto"
    dtype: str = "float32"
    hparams_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset: str = "faithful"

    def configs(self) -> list[RunConfig]:
        out = []
        for model, suite, method, seed in itertools.product(self.models, self.suites,
                                                           self.methods, self.seeds):
            out.append(RunConfig(
                model=model, method=method, suite=suite, seed=seed, n_edits=self.n_edits,
                batch_size=self.batch_size, sequential=self.sequential, start=self.start,
                data=self.data,
                eval_every=self.eval_every, downstream=list(self.downstream),
                downstream_limit=self.downstream_limit,
                generation_tokens=self.generation_tokens, out_dir=self.out_dir,
                device=self.device, dtype=self.dtype,
                hparams_overrides=dict(self.hparams_overrides.get(method, {})),
                preset=self.preset))
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
    try:
        data = safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"grid {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    parts = data if isinstance(data, list) else [data]
    grids = []
    for i, part in enumerate(parts):
        where = f"grid {path}" + (f", part {i + 1} of {len(parts)}" if len(parts) > 1 else "")
        _check_part(part, where)
        grid = Grid(**part)
        for cfg in grid.configs():
            try:
                cfg.validate()
            except UserError as exc:
                raise UserError(f"{where} ({cfg.method} / {cfg.suite} / seed {cfg.seed}): "
                                f"{exc}") from exc
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


def _check_part(part: Any, where: str) -> None:
    """One line for a grid entry that is not a mapping, has unknown or missing keys, or a value
    of the wrong type (e.g. ``n_edits: ten``, ``methods: rome`` for a list)."""
    if not isinstance(part, dict):
        raise UserError(f"{where}: expected a mapping of grid keys, got {type(part).__name__}")
    hints = get_type_hints(Grid)  # field name -> annotation, in field order
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
            raise UserError(f"{where}: {key}: expected {shown}, got {value!r}")


def read_run_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest of the run in ``run_dir``, None where it has none; ValueError saying what
    is wrong where it cannot be used (cut short, edited: :func:`harness.resume.parse_manifest`).
    Read without the run's lock: manifests are replaced atomically, never half-written."""
    from harness.resume import parse_manifest

    path = run_dir / rec_io.MANIFEST
    return parse_manifest(path) if path.exists() else None


def is_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete run (a manifest that cannot be read: no)."""
    try:
        manifest = read_run_manifest(run_dir)
    except ValueError:
        return False
    return manifest is not None and manifest.get("status") == "complete"


def needs_run(cfg: RunConfig) -> bool:
    run_dir = Path(cfg.out_dir) / cfg.default_run_id()
    return not is_complete(run_dir) or bool(stale(run_dir, cfg))


def stale(run_dir: Path, cfg: RunConfig) -> list[str]:
    """What a complete run's manifest holds that this grid would now do differently: resolved
    hparams (a changed hparams YAML keeps the config hash), the data file's hash, and the code
    (a commit with changes to harness/, methods/ or suites/ since the run's commit:
    :func:`harness.records.code_changed`; a commit that changed only prose, reports or grid
    files keeps the run)."""
    from harness.resume import parse_manifest
    from harness.runner import differences, prepare

    manifest = parse_manifest(run_dir / rec_io.MANIFEST)
    diffs, git = differences(prepare(cfg), manifest, allow_revision_change=True)
    old = manifest["git"].get("commit")
    if rec_io.code_changed(old, git["commit"]):
        diffs.append(f"code (git commit {old} in the manifest, {git['commit']} now, with "
                     f"changes to harness/, methods/ or suites/ between them)")
    return diffs


def _set_aside(run_dir: Path) -> Path:
    """Rename the run directory to ``<name>.stale-<n>``, everything in it kept (results are
    never deleted). Only under the run's lock (:func:`harness.launch.run_cell`), so a run
    that is still going is never moved."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.stale-{n}")
    run_dir.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.benchmark")
    ap.add_argument("--grid", default="default")
    ap.add_argument("--out", default=None, help="override the grid's out_dir")
    ap.add_argument("--report-dir", default=None, help="override the grid's report_dir")
    ap.add_argument("--no-report", action="store_true", help="only run the grid")
    ap.add_argument("--device", default=None, help="override the grid's device")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the grid in this many processes at once (timings then share the "
                         "device; the manifests say so)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated: run only these methods of the grid")
    ap.add_argument("--seeds", default=None, help="comma-separated: run only these seeds")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "I/N", used by --jobs
    sub = ap.add_argument_group("launcher (harness/launch.py)")
    sub.add_argument("--launcher", choices=("local", "submitit"), default="local",
                     help="local: this process and --jobs workers (default); submitit: one "
                          "job per run (a Slurm job array after a cache warm-up job)")
    sub.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                     help="submitit executor (local: jobs on this machine; debug: in-process)")
    sub.add_argument("--partition", default=None, help="Slurm partition")
    sub.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per job (default 0)")
    sub.add_argument("--cpus-per-task", type=int, default=None,
                     help="CPU cores per job (also its torch threads)")
    sub.add_argument("--max-parallel", type=int, default=8,
                     help="runs at once (the Slurm array's %%K; default 8)")
    sub.add_argument("--timeout-min", type=int, default=24 * 60,
                     help="time limit per job in minutes (a job that reaches it is requeued "
                          "and continues; default 1440)")
    sub.add_argument("--log-dir", default=None,
                     help="submitit's job files and logs (default <out>/.submitit; on Slurm a "
                          "directory every node sees)")
    sub.add_argument("--no-wait", action="store_true",
                     help="Slurm: submit and return (report later with keh report)")
    args = ap.parse_args(argv)
    from harness import launch

    try:
        grids = load_grid(args.grid)
        configs = []
        for grid in grids:
            if args.out:
                grid.out_dir = args.out
            if args.device:
                grid.device = args.device
            configs += [c for c in grid.configs() if c not in configs]
        if args.methods:
            keep = set(args.methods.split(","))
            unknown = keep - {c.method for c in configs}
            if unknown:
                raise UserError(f"--methods: {sorted(unknown)} not in grid {args.grid}")
            configs = [c for c in configs if c.method in keep]
        if args.seeds:
            seeds = {int(x) for x in args.seeds.split(",")}
            configs = [c for c in configs if c.seed in seeds]
        if args.launcher == "submitit":
            if args.jobs > 1:
                raise UserError("--jobs is for --launcher local; with submitit use "
                                "--max-parallel")
            opts = launch.LaunchOptions(
                cluster=args.cluster, partition=args.partition, gpus_per_task=args.gpus_per_task,
                cpus_per_task=args.cpus_per_task, max_parallel=args.max_parallel,
                timeout_min=args.timeout_min, log_dir=args.log_dir, wait=not args.no_wait)
            launch.submit_grid(configs, opts)
            if args.no_wait:
                return 0
        elif not args.shard:  # workers find the caches filled by their parent
            pending = [c for c in configs if needs_run(c)]
            if pending:
                warm_caches(pending)
        if args.jobs > 1:
            _run_jobs(argv if argv is not None else sys.argv[1:], args.jobs)
            args.shard = None
        elif args.shard:
            index, total = (int(x) for x in args.shard.split("/"))
            configs = configs[index::total]
            args.no_report = True
        run_dirs = [Path(c.out_dir) / c.default_run_id() for c in configs]
        if args.jobs == 1 and args.launcher == "local":  # else workers or jobs ran them
            lm_for = launch.model_loader()
            for i, cfg in enumerate(configs):
                prefix = f"[{i + 1}/{len(configs)}]"
                launch.run_cell(cfg, log=lambda s, p=prefix: print(f"{p} {s}"), lm_for=lm_for)
        missing = [str(d) for d in run_dirs if not is_complete(d)]
        if missing:  # a worker failed, or a run is still going in another process
            raise UserError(f"run(s) {', '.join(missing)} did not complete here (see above); "
                            f"launch the grid again to continue them (a run still going in "
                            f"another process is left alone)")
        print_table(run_dirs)
        if not args.no_report:
            from reports.build import build_report

            index = build_report(run_dirs, Path(args.report_dir or grids[0].report_dir))
            print(f"report: {index}")
    except UserError as exc:
        print(f"keh: error: {exc}", file=sys.stderr)
        return 2
    return 0


def needs_warm(cfg: RunConfig) -> bool:
    """Whether the run of ``cfg`` reads a cache :func:`warm_caches` fills (key statistics and
    projectors of a locate-then-edit method, the unedited model's downstream scores)."""
    from methods import get_method
    from methods.base import load_hparams
    from methods.locate import LocateHparams

    if cfg.downstream:
        return True
    hp, _ = load_hparams(get_method(cfg.method).Hparams, cfg.method, cfg.model, cfg.hparams,
                         cfg.hparams_overrides, preset=cfg.preset)
    return isinstance(hp, LocateHparams)


def warm_caches(configs: list[RunConfig]) -> None:
    """Fill the on-disk caches the runs of ``configs`` read, once: the key statistics of the
    union of the locate-then-edit runs' layers in one pass over the corpus per model (instead
    of one pass per run, or concurrent passes by parallel workers), the null-space projectors,
    and the unedited model's downstream scores. The runs then load them; numbers do not
    change."""
    from harness.models import cache_dir, load_model
    from harness.paths import data_dir
    from methods import get_method
    from methods.base import load_hparams
    from methods.locate import LocateHparams, layer_statistics, projectors
    from suites import downstream

    by_model: dict[tuple[str, str, str, int], list[Any]] = {}
    evals: dict[tuple[str, str, str, int], set[tuple[Any, ...]]] = {}
    for cfg in configs:
        key = (cfg.model, cfg.device, cfg.dtype, cfg.seed)
        hp, _ = load_hparams(get_method(cfg.method).Hparams, cfg.method, cfg.model, cfg.hparams,
                             cfg.hparams_overrides, preset=cfg.preset)
        by_model.setdefault(key, [])
        if isinstance(hp, LocateHparams):
            by_model[key].append(hp)
        if cfg.downstream:
            evals.setdefault(key, set()).add((tuple(cfg.downstream), cfg.data_dir,
                                              cfg.downstream_limit, cfg.downstream_fewshot,
                                              cfg.eval_batch_size))
    for key, hps in by_model.items():
        if not hps and key not in evals:
            continue
        model, device, dtype, seed = key
        lm = load_model(model, device, dtype, seed=seed)  # random:<shape> weights follow the seed
        for tasks, ddir, limit, shots, bs in sorted(evals.get(key, ()), key=str):
            # the unedited model's downstream scores, which every such run starts with
            downstream.evaluate_unedited(lm, list(tasks), data_dir(ddir),
                                         cache_dir() / "downstream", limit=limit or None,
                                         num_fewshot=shots, batch_size=bs)
        union: dict[tuple[Any, ...], tuple[Any, set[int]]] = {}
        for hp in hps:
            corpus = (hp.stats_corpus, hp.stats_tokens, hp.stats_seq_len,
                      getattr(hp, "stats_sampling", "tokens"), getattr(hp, "stats_records", 0))
            union.setdefault(corpus, (hp, set()))[1].update(hp.layers)
        for hp, layers in union.values():
            layer_statistics(lm, hp, sorted(layers))
        for hp in hps:
            if getattr(hp, "nullspace_threshold", None) is not None:
                projectors(lm, hp, hp.layers)
        del lm


def _run_jobs(argv: list[str], jobs: int) -> None:
    """Run the grid as ``jobs`` shard processes (configs i, i+jobs, ...) and wait for them;
    each gets an equal share of the CPU threads unless ``OMP_NUM_THREADS`` is set."""
    base: list[str] = []
    skip_value = False
    for a in argv:  # the worker's arguments: the parent's without "--jobs N" / "--jobs=N"
        if skip_value or a.startswith("--jobs="):
            skip_value = False
            continue
        skip_value = a == "--jobs"
        if not skip_value:
            base.append(a)
    env = {**os.environ, "KEH_CONCURRENT_JOBS": str(jobs)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    if "--no-report" not in base:
        base.append("--no-report")
    procs = [subprocess.Popen([sys.executable, "-m", "harness.benchmark", *base,
                               "--shard", f"{i}/{jobs}"], env=env) for i in range(jobs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise UserError(f"benchmark workers exited with {codes}")


def print_table(run_dirs: list[Path]) -> None:
    import pandas as pd

    rows = []
    for d in run_dirs:
        m = json.loads((d / rec_io.MANIFEST).read_text())
        rows.append({"suite": m["config"]["suite"], "method": m["method"],
                     "model": m["config"]["model"], "seed": m["seed"],
                     "overrides": json.dumps(m["config"].get("hparams_overrides") or {}),
                     **m.get("summary", {}),
                     "time_per_edit_s": m.get("timings", {}).get("time_per_edit_s")})
    frame = pd.DataFrame(rows)
    try:
        print(frame.to_markdown(index=False, floatfmt=".2f"))
    except ImportError:  # tabulate missing
        print(frame.to_string(index=False, float_format="%.2f"))


if __name__ == "__main__":
    sys.exit(main())
