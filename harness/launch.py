"""Launch a grid's runs as submitit jobs: a Slurm job array (or submitit's local/debug executor).

One job fills the shared caches first (:func:`harness.benchmark.warm_caches`: key statistics
and null-space projectors of the union of the grid's layers, the unedited downstream scores),
into ``$KEH_CACHE``, which every job gets from the submitting process and which must be on
storage all nodes see. Then each pending grid cell is one job (:class:`CellJob`, which calls
:func:`run_cell`); on Slurm the cells are one array (``--array=0-<n-1>%<max_parallel>``) that
depends on the warm job (``--dependency=afterok:<id>``); on the local executor the launcher
waits for the warm job, then keeps at most ``max_parallel`` cell jobs running. Two jobs never
compute the same statistics at once even without the dependency: statistics files are
computed under a per-key lock and written atomically (:mod:`harness.cachefiles`).

:func:`run_cell` is also what the local launcher (``--launcher local``, ``--jobs N``) runs per
cell, so both launchers treat a run directory the same way, always holding its run lock
(:func:`harness.cachefiles.run_lock`): held by another process (a run still going): left
alone, one line; complete and up to date: skipped; complete but stale
(:func:`harness.benchmark.stale`): set aside and run again; killed (a manifest, not complete):
continued with :func:`harness.runner.resume` (``keh run --resume``), unless its config,
hparams, data file or code revision differ from what the grid would now run (then set aside
and run again); a manifest that cannot be read, or files without a manifest: set aside and run
again; killed before its manifest (nothing but the lock): started again in it. Set aside means
renamed to ``<run>.stale-<n>``, everything kept.
So a job that dies (pre-emption, time limit, a kill) is continued by submitting the grid
again; on a time limit or pre-emption signal, submitit also requeues the job itself
(:class:`CellJob` is checkpointable) and it continues the same way.

submitit keeps its job files (pickled calls and results, logs) in the log directory
(default ``<out_dir>/.submitit``, which ``keh report`` skips: no manifest); they are written
and read only by the submitting user's own processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.benchmark import (
    _set_aside,
    needs_run,
    needs_warm,
    read_run_manifest,
    stale,
    warm_caches,
)
from harness.cachefiles import LOCK_NAME, run_lock
from harness.config import RunConfig
from harness.errors import RunInUse, UserError

CLUSTERS = ("slurm", "local", "debug")
#: environment a job needs to see what the submitting process sees (caches, data, offline)
FORWARDED_ENV = ("KEH_CACHE", "KEH_DATA_DIR", "KEH_SMOLLM2_GGUF", "HF_HOME", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class LaunchOptions:
    """How the grid is submitted. ``gpus_per_task``: GPUs each job gets (submitit's
    ``gpus_per_node``, one task per job; the local executor hides the GPUs from a job that asks
    for none). ``max_parallel``: cell jobs running at once (Slurm: the array's ``%K``).
    ``timeout_min``: each job's time limit (submitit requeues a job that reaches it and it
    continues from its last checkpoint). ``cpus_per_task``: CPU cores per job (also its torch
    threads); None: Slurm's default, and on the local executor the machine's cores shared
    equally by ``max_parallel`` jobs (as ``--jobs``). ``wait``: wait for the jobs (then the
    table and report follow); off (Slurm only): submit and return."""

    cluster: str = "slurm"
    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    max_parallel: int = 8
    timeout_min: int = 24 * 60
    log_dir: str | None = None
    wait: bool = True

    def validate(self) -> None:
        if self.cluster not in CLUSTERS:
            raise UserError(f"--cluster must be one of {', '.join(CLUSTERS)} "
                            f"(got {self.cluster!r})")
        for name in ("gpus_per_task", "max_parallel", "timeout_min", "cpus_per_task"):
            value = getattr(self, name)
            low = 0 if name == "gpus_per_task" else 1
            if value is not None and value < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low} "
                                f"(got {value})")
        if not self.wait and self.cluster != "slurm":
            raise UserError("--no-wait needs --cluster slurm (local and debug jobs end with "
                            "the process that submitted them)")


# ------------------------------------------------------------------------------ one cell


def model_loader() -> Callable[[RunConfig], Any]:
    """``lm_for(cfg)`` for :func:`run_cell`: the last loaded model, reused while model, device,
    dtype and seed (random weights depend on it) stay the same, else a fresh load."""
    from harness.models import load_model

    loaded: dict[str, Any] = {}

    def lm_for(cfg: RunConfig) -> Any:
        key = f"{cfg.model}|{cfg.device}|{cfg.dtype}|{cfg.seed}"
        if key not in loaded:
            loaded.clear()
            loaded[key] = load_model(cfg.model, cfg.device, cfg.dtype, seed=cfg.seed,
                                     trust_remote_code=cfg.trust_remote_code)
        return loaded[key]

    return lm_for


def run_cell(cfg: RunConfig, log: Callable[[str], None] = print,
             lm_for: Callable[[RunConfig], Any] | None = None) -> str:
    """Bring the run of ``cfg`` (``<out_dir>/<default run id>``) to complete; return what was
    done: ``skipped``, ``resumed``, ``ran``, or ``busy`` when another process holds the run's
    lock (a run still going: left alone, one line). Everything it does to an existing run
    directory (read its manifest, decide, set it aside, resume it) happens under that lock.
    ``lm_for(cfg)`` gives a loaded, unedited model to reuse (None: the run loads its own)."""
    from harness.runner import run

    run_dir = Path(cfg.out_dir) / cfg.default_run_id()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file where the grid keeps this run's directory; move "
                        f"it away, then launch the grid again")
    try:
        with contextlib.ExitStack() as held:
            if run_dir.exists():
                held.enter_context(run_lock(run_dir))
                done = _settle(cfg, run_dir, log, lm_for)
                if done:
                    return done
            log(f"{cfg.method} / {cfg.suite} / {cfg.model} / seed {cfg.seed}")
            run(cfg, lm=lm_for(cfg) if lm_for else None)  # a given model comes back unedited
            return "ran"
    except RunInUse as exc:
        log(f"left alone: {exc.run_dir} is in use by another keh process{exc.holder} (a run "
            f"still going); launch the grid again once it has finished")
        return "busy"


def _settle(cfg: RunConfig, run_dir: Path, log: Callable[[str], None],
            lm_for: Callable[[RunConfig], Any] | None) -> str | None:
    """With the run's lock held: ``skipped`` (complete and up to date) or ``resumed``
    (killed, and continued); None when the run is to be started in ``run_dir``, which is then
    free: a stale, unreadable or unrelated run was set aside (everything kept)."""
    from harness.runner import differences, prepare, resume

    try:
        manifest = read_run_manifest(run_dir)
    except ValueError as exc:
        kept = _set_aside(run_dir)
        log(f"{run_dir / rec_io.MANIFEST} {exc}; the run is kept as {kept}, running again")
        return None
    if manifest is None:
        ckpt.remove_temp_files(run_dir)  # e.g. the manifest's, if killed writing it
        if {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
            log(f"run {run_dir} was killed before it started; starting it again")
            return None
        kept = _set_aside(run_dir)
        log(f"{run_dir} holds files but no {rec_io.MANIFEST} (a start killed early, or not "
            f"a run); kept as {kept}, starting the run again")
        return None
    if manifest.get("status") == "complete":
        changed = stale(run_dir, cfg)
        if not changed:
            log(f"skip (complete): {run_dir}")
            return "skipped"
        kept = _set_aside(run_dir)
        log(f"{run_dir} is complete but stale: {'; '.join(changed)}; kept as {kept}, "
            f"running again")
        return None
    diffs, _ = differences(prepare(cfg), manifest, allow_revision_change=False)
    if not diffs:
        log(f"incomplete run {run_dir} is continued (keh run --resume)")
        resume(run_dir, lm=lm_for(cfg) if lm_for else None)
        return "resumed"
    kept = _set_aside(run_dir)
    log(f"incomplete run {run_dir} cannot be continued: {'; '.join(diffs)} differ(s); "
        f"kept as {kept}, running again")
    return None


def _enter_job(env: dict[str, str]) -> None:
    """In a job: the submitting process's caches and data, and the job's share of threads."""
    os.environ.update(env)
    threads = env.get("KEH_JOB_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


class CellJob(submitit.helpers.Checkpointable):
    """One grid cell as a submitit job. Checkpointable: on a time limit or pre-emption
    signal submitit resubmits the same call, which continues the killed run."""

    def __call__(self, config: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
        _enter_job(env)
        cfg = RunConfig.from_dict(config)
        action = run_cell(cfg)
        return {"run_dir": str(Path(cfg.out_dir) / cfg.default_run_id()), "action": action}


def warm_job(configs: list[dict[str, Any]], env: dict[str, str]) -> int:
    """The job the cell jobs wait for: :func:`harness.benchmark.warm_caches`."""
    _enter_job(env)
    warm_caches([RunConfig.from_dict(c) for c in configs])
    return len(configs)


# ------------------------------------------------------------------------------ submission


def job_env(opts: LaunchOptions) -> dict[str, str]:
    """What each job must see: ``KEH_CACHE`` (resolved here, so every job uses the same
    directory), the data directory and offline switches if set; on the local executor the
    share of cores (``KEH_JOB_THREADS``) and ``KEH_CONCURRENT_JOBS`` (the manifests then say
    their timings shared the machine)."""
    from harness.models import cache_dir

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["KEH_CACHE"] = str(cache_dir().absolute())
    if "KEH_DATA_DIR" in env:
        env["KEH_DATA_DIR"] = str(Path(env["KEH_DATA_DIR"]).absolute())
    threads = opts.cpus_per_task
    if opts.cluster == "local":
        env["KEH_CONCURRENT_JOBS"] = str(opts.max_parallel)
        if threads is None and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, (os.cpu_count() or 1) // opts.max_parallel)
    if threads:
        env["KEH_JOB_THREADS"] = str(threads)
    return env


def make_executor(opts: LaunchOptions, folder: Path, name: str,
                  dependency: str | None = None) -> submitit.AutoExecutor:
    """A submitit executor for ``opts.cluster`` with the job resources of ``opts``;
    ``dependency``: a Slurm job id this job (array) starts after, once it succeeded."""
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=opts.cluster)
    params: dict[str, Any] = {"name": name, "timeout_min": opts.timeout_min,
                              "gpus_per_node": opts.gpus_per_task, "tasks_per_node": 1,
                              "nodes": 1, "slurm_array_parallelism": opts.max_parallel}
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if dependency:  # and cancelled by Slurm if that job fails, instead of waiting forever
        params["slurm_dependency"] = f"afterok:{dependency}"
        params["slurm_additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    ex.update_parameters(**params)
    return ex


def submit_grid(configs: list[RunConfig], opts: LaunchOptions,
                log: Callable[[str], None] = print) -> list[submitit.Job[Any]]:
    """Submit the warm job and one job per pending cell of ``configs`` (complete, up-to-date
    runs are skipped here); wait for them unless ``opts.wait`` is off. Returns the cell jobs.
    A job that failed is named with its log file; its cell is left for a resubmission."""
    opts.validate()
    out_dirs = sorted({c.out_dir for c in configs})
    folder = Path(opts.log_dir or Path(out_dirs[0]) / ".submitit").absolute()
    configs = [_absolute(c) for c in configs]
    pending = []
    for i, cfg in enumerate(configs):
        if needs_run(cfg):
            pending.append(cfg)
        else:
            log(f"[{i + 1}/{len(configs)}] skip (complete): "
                f"{Path(cfg.out_dir) / cfg.default_run_id()}")
    if not pending:
        return []
    env = job_env(opts)
    dicts = [c.to_dict() for c in pending]
    to_warm = [c.to_dict() for c in pending if needs_warm(c)]
    warm = None
    if to_warm:
        warm = make_executor(opts, folder, "keh-warm").submit(warm_job, to_warm, env)
        log(f"warm-up job {warm.job_id} ({opts.cluster}): statistics, projectors and "
            f"downstream baselines for {len(to_warm)} run(s) into {env['KEH_CACHE']}")
    if opts.cluster == "slurm":
        ex = make_executor(opts, folder, "keh-grid", dependency=warm and warm.job_id)
        jobs = ex.map_array(CellJob(), dicts, [env] * len(dicts))
        log(f"job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} run(s), at most "
            f"{opts.max_parallel} at once{f', after job {warm.job_id}' if warm else ''}; "
            f"logs in {folder}")
        if not opts.wait:
            return jobs
        if warm is not None:
            _result(warm, "warm-up job")  # if it failed, Slurm cancels the array
    else:
        if warm is not None:
            _result(warm, "warm-up job")  # the cells read what it wrote
        ex = make_executor(opts, folder, "keh-grid")
        jobs = _capped(ex, dicts, env, opts.max_parallel, log)
    failed = []
    for cfg, job in zip(pending, jobs, strict=True):
        try:
            out = job.result()
            log(f"job {job.job_id}: {out['action']} {out['run_dir']}")
        except Exception as exc:  # a job's failure is reported, the others still count
            failed.append(f"{cfg.default_run_id()} (job {job.job_id}: "
                          f"{_last_line(exc)}; log {job.paths.stderr})")
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} run(s) did not complete: "
                        f"{'; '.join(failed)}; submit the grid again to continue them")
    return jobs


def _capped(ex: submitit.AutoExecutor, dicts: list[dict[str, Any]], env: dict[str, str],
            cap: int, log: Callable[[str], None]) -> list[submitit.Job[Any]]:
    """Submit one job per config to a local/debug executor, at most ``cap`` unfinished at
    once (Slurm's ``%cap`` does this for an array); return the jobs in config order."""
    jobs: list[submitit.Job[Any]] = []
    while len(jobs) < len(dicts):
        if ex.cluster == "debug" or sum(not j.done() for j in jobs) < cap:
            jobs.append(ex.submit(CellJob(), dicts[len(jobs)], env))
            log(f"job {jobs[-1].job_id}: {RunConfig.from_dict(dicts[len(jobs) - 1]).method} "
                f"(cell {len(jobs)}/{len(dicts)})")
        else:
            time.sleep(0.2)
    return jobs


def _result(job: submitit.Job[Any], what: str) -> Any:
    try:
        return job.result()
    except Exception as exc:
        raise UserError(f"{what} {job.job_id} failed: {_last_line(exc)} (log "
                        f"{job.paths.stderr})") from exc


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _absolute(cfg: RunConfig) -> RunConfig:
    """``cfg`` with an absolute ``out_dir``, so a job finds it whatever its working directory
    (``out_dir`` is not part of the run's identity)."""
    d = cfg.to_dict()
    d["out_dir"] = str(Path(cfg.out_dir).absolute())
    return RunConfig.from_dict(d)
