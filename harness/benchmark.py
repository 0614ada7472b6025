"""``nox -s benchmark``: run a declared grid of runs, skip the complete ones, then summarise.

A grid is a YAML file (``harness/grids/<name>.yaml`` or any path; its schema:
:mod:`harness.grid`). ``--jobs N`` runs the grid in N processes
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
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import records as rec_io
from harness.config import RunConfig
from harness.errors import UserError
from harness.grid import GRIDS, Grid, load_grid
from harness.helptext import HelpFormatter
from harness.progress import GridProgress, balanced_shard

__all__ = ["GRIDS", "Grid", "load_grid", "main"]

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


#: the grid without --grid: CPU / GPU
DEFAULT_GRID, GPU_GRID = "default", "smollm2-100"


def _positive(text: str) -> int:
    """An integer of at least 1 (``--jobs``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness.benchmark",
                                 description="Run a grid of runs (complete ones are skipped, "
                                             "killed ones continued), print the results and "
                                             "build the report; nox -s benchmark runs it.",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--grid", default=None,
                    help=f"a grid of harness/grids/ by name, or a YAML path (default: "
                         f"{DEFAULT_GRID}, or {GPU_GRID} when a GPU is present)")
    ap.add_argument("--out", default=None, help="override the grid's out")
    ap.add_argument("--report-dir", default=None, help="override the grid's report_dir")
    ap.add_argument("--no-report", action="store_true", help="only run the grid")
    ap.add_argument("--device", default=None, help="override the grid's device")
    ap.add_argument("--jobs", type=_positive, default=1,
                    help="run the grid in this many processes at once (timings then share the "
                         "device; the manifests say so)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated: run only these methods of the grid")
    ap.add_argument("--seeds", default=None, help="comma-separated: run only these seeds")
    ap.add_argument("--n-edits", type=int, default=None,
                    help="every run edits at most its first N cases (a quick check that each "
                         "cell runs; other run ids than the full grid's)")
    ap.add_argument("--progress-every", type=float, default=60.0,
                    help="seconds between overall progress lines while --jobs workers run")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "I/N", used by --jobs
    sub = ap.add_argument_group("launcher (harness/launch.py)")
    sub.add_argument("--launcher", choices=("local", "submitit"), default="local",
                     help="local: this process and --jobs workers; submitit: one job per run "
                          "(a Slurm job array after a cache warm-up job)")
    sub.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                     help="submitit executor (local: jobs on this machine; debug: in-process)")
    sub.add_argument("--partition", default=None, help="Slurm partition")
    sub.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per job")
    sub.add_argument("--cpus-per-task", type=int, default=None,
                     help="CPU cores per job (also its torch threads)")
    sub.add_argument("--max-parallel", type=int, default=8,
                     help="runs at once (the Slurm array's %%K)")
    sub.add_argument("--timeout-min", type=int, default=24 * 60,
                     help="time limit per job in minutes (a job that reaches it is requeued "
                          "and continues)")
    sub.add_argument("--log-dir", default=None,
                     help="submitit's job files and logs (default <out>/.submitit; on Slurm a "
                          "directory every node sees)")
    sub.add_argument("--no-wait", action="store_true",
                     help="Slurm: submit and return (report later with keh report)")
    return ap


def choose_grid(name: str | None) -> tuple[str, str | None]:
    """The grid to run and, when none was named, a line saying which and why."""
    if name is not None:
        return name, None
    import torch

    if torch.cuda.is_available():
        return GPU_GRID, (f"grid: {GPU_GRID} (no --grid given and a GPU is present: the "
                          f"100-case comparison of every method, 3 seeds for the paired arms)")
    return DEFAULT_GRID, (f"grid: {DEFAULT_GRID} (no --grid given and no GPU; with a GPU the "
                          f"default is {GPU_GRID})")


def select(configs: list[RunConfig], args: argparse.Namespace) -> list[RunConfig]:
    """``configs`` filtered by ``--methods`` / ``--seeds`` and cut by ``--n-edits``."""
    if args.methods:
        keep = set(args.methods.split(","))
        unknown = keep - {c.method for c in configs}
        if unknown:
            raise UserError(f"--methods: {sorted(unknown)} not in grid {args.grid}")
        configs = [c for c in configs if c.method in keep]
    if args.seeds:
        seeds = {int(x) for x in args.seeds.split(",")}
        configs = [c for c in configs if c.seed in seeds]
    if args.n_edits is not None:
        if args.n_edits < 1:
            raise UserError(f"--n-edits must be at least 1 (got {args.n_edits})")
        for c in configs:
            c.n_edits = min(c.n_edits, args.n_edits)
    return configs


def report_folders(entries: list[tuple[RunConfig, Grid]], override: Path | None = None
                   ) -> tuple[dict[Path, Path], dict[Path, str]]:
    """(run dir -> report folder, run dir -> part of a claims study) for the runs of
    ``entries`` (each config with the grid entry that named it; after ``--n-edits``, whose
    run ids differ). The folder is the entry's ``report_dir``; ``--report-dir`` replaces
    it, and where the entries name several, each goes to a folder of its name under it (one
    report never mixes designs)."""
    names = list(dict.fromkeys(g.report_dir for _, g in entries))
    report_of, part_of = {}, {}
    for cfg, grid in entries:
        run_dir = Path(cfg.out_dir) / cfg.default_run_id()
        folder = Path(grid.report_dir)
        if override is not None:
            folder = override / folder.name if len(names) > 1 else override
        report_of.setdefault(run_dir, folder)
        if grid.study:
            part_of.setdefault(run_dir, grid.study)
    return report_of, part_of


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from harness import launch

    try:
        args.grid, note = choose_grid(args.grid)
        if note and not args.shard:
            print(note)
            argv += ["--grid", args.grid]  # workers run the same grid
        grids = load_grid(args.grid)
        configs = []
        entry_of: dict[int, Grid] = {}  # id(config) -> the grid entry that first named it
        for grid in grids:
            if args.out:
                grid.out = args.out
            if args.device:
                grid.device = args.device
            for c in grid.configs():
                if c not in configs:
                    configs.append(c)
                    entry_of[id(c)] = grid
        configs = select(configs, args)  # filters and cuts in place: the same objects
        report_of, part_of = report_folders(
            [(c, entry_of[id(c)]) for c in configs],
            Path(args.report_dir) if args.report_dir else None)
        progress = GridProgress(configs, jobs=args.jobs)
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
        progress.runs_begin()
        if args.jobs > 1:
            print(progress.line(), flush=True)
            _run_jobs(argv, args.jobs, lambda: print(f"\n{progress.line()}", flush=True),
                      args.progress_every)  # on a line of its own below the workers' bars
            args.shard = None
        elif args.shard:
            index, total = (int(x) for x in args.shard.split("/"))
            configs = balanced_shard(configs, index, total)
            args.no_report = True
        run_dirs = [Path(c.out_dir) / c.default_run_id() for c in configs]
        if args.jobs == 1 and args.launcher == "local":  # else workers or jobs ran them
            lm_for = launch.model_loader()
            for i, cfg in enumerate(configs):
                prefix = f"[{i + 1}/{len(configs)}]"
                if not args.shard:
                    print(progress.line(), flush=True)
                launch.run_cell(cfg, log=lambda s, p=prefix: print(f"{p} {s}"), lm_for=lm_for)
        missing = [str(d) for d in run_dirs if not is_complete(d)]
        if missing:  # a worker failed, or a run is still going in another process
            raise UserError(f"run(s) {', '.join(missing)} did not complete here (see above); "
                            f"launch the grid again to continue them (a run still going in "
                            f"another process is left alone)")
        if not args.shard:
            print(progress.line())
            finish(run_dirs, args.grid, None if args.no_report else report_of, part_of)
    except UserError as exc:
        print(f"keh: error: {exc}", file=sys.stderr)
        return 2
    return 0


def finish(run_dirs: list[Path], grid: str, report_dir: Path | dict[Path, Path] | None,
           part_of: dict[Path, str] | None = None) -> None:
    """Print the final table, the headline contrasts and, for the reproduction grid, the
    verdicts, and write the report (and its ``headline.md``), once per report folder:
    ``report_dir`` is one folder for every run, a run dir -> folder mapping (each grid
    entry's ``report_dir``), or None for no report. With ``part_of`` (run dir -> part of a
    claims study) also the study's verdicts (:func:`reports.study.write_study`)."""
    from harness import console, headline, reproduce

    if not run_dirs:
        print("no run of the grid is left after --methods/--seeds: nothing to show")
        return
    groups: dict[Path | None, list[Path]] = {}
    for d in run_dirs:
        where = report_dir[d] if isinstance(report_dir, dict) else report_dir
        groups.setdefault(where, []).append(d)
    for where, dirs in groups.items():
        print()
        if len(groups) > 1:
            print(f"runs of {where}:")
        print(console.summary(dirs))
        rows = headline.headline_rows(dirs)
        text = headline.headline_markdown(rows)
        if text:
            print(text)
        if Path(grid).stem == reproduce.GRID:
            print("\n".join(reproduce.verdict_lines(dirs)) + "\n")
        if where is not None:
            from reports.build import build_report

            index = build_report(dirs, where)
            if text:
                (where / "headline.md").write_text(text, encoding="utf-8")
            print(f"report: {index} (every table with its intervals, the paired comparisons "
                  f"and the claims of docs/METAKE.md" + (f"; headline contrasts: "
                                                         f"{where / 'headline.md'}" if text
                                                         else "") + ")")
    parts: dict[str, list[Path]] = {}
    for d in run_dirs:
        if part_of and d in part_of:
            parts.setdefault(part_of[d], []).append(d)
    if parts and report_dir is not None:
        from reports.study import write_study

        first = next(iter(parts.values()))[0]  # the first run of the study, in grid order
        out = (report_dir[first] if isinstance(report_dir, dict) else report_dir).parent
        print(f"\nclaims study ({', '.join(f'{k}: {len(v)} runs' for k, v in parts.items())})"
              f":\n" + write_study(parts, out) + f"study: {out / 'study.md'} "
              f"(docs/RESULTS.md explains it)")


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


def _run_jobs(argv: list[str], jobs: int, tick: Callable[[], None] | None = None,
              every: float = 60.0) -> None:
    """Run the grid as ``jobs`` shard processes (:func:`harness.progress.balanced_shard`) and
    wait for them,
    calling ``tick`` every ``every`` seconds meanwhile; each gets an equal share of the CPU
    threads unless ``OMP_NUM_THREADS`` is set."""
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
    codes = []
    for p in procs:
        while True:
            try:
                codes.append(p.wait(timeout=every))
                break
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
    if any(codes):
        raise UserError(f"benchmark workers exited with {codes}")


if __name__ == "__main__":
    sys.exit(main())
