"""``--launcher submitit`` (harness/launch.py): the grid as submitit jobs, for real on submitit's
local executor (two jobs at once), a job killed mid-run and the grid submitted again; the
records equal the local launcher's. The Slurm path is checked up to ``sbatch``: the scripts
submitit writes for the warm-up job and the array (a stand-in ``sbatch`` records them)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.benchmark import load_grid, main
from harness.cli import main as keh_main
from tests.test_resume import _private_cache

TINY_AE = {"layers": [1, 2], "stats_tokens": 4000, "v_steps": 5, "n_context": 1}


def _grid(tmp_path: Path) -> Path:
    """Two tiny-model cells (ft; alphaedit, which needs key statistics: the warm-up job's) and
    one SmolLM2 cell (noop, 2 edits: no statistics, seconds to evaluate)."""
    common = {"suites": ["counterfact"], "data": "counterfact/counterfact-val.json",
              "seeds": [0], "out_dir": str(tmp_path / "runs"), "device": "cpu"}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([
        {**common, "models": ["random:llama-tiny"], "methods": ["ft", "alphaedit"],
         "n_edits": 10, "batch_size": 1, "sequential": True,
         "hparams_overrides": {"ft": {"layers": [1], "steps": 2}, "alphaedit": TINY_AE}},
        {**common, "models": ["smollm2-135m"], "methods": ["noop"], "n_edits": 2,
         "batch_size": 2, "sequential": False},
    ]))
    return grid


def _run_dirs(grid: Path, out: Path) -> dict[str, Path]:
    return {c.default_run_id(): out / c.default_run_id()
            for g in load_grid(str(grid)) for c in g.configs()}


def _progress(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _manifest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / rec_io.MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_submitit_local_kill_resubmit_equals_local_launcher(tmp_path, tiny_lm, shared_data,
                                                            monkeypatch, capsys):
    cache = _private_cache(tmp_path / "cache")  # borrows the converted models, own statistics
    monkeypatch.setenv("KEH_CACHE", str(cache))
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    # one thread in the jobs and here: the thread count changes float reduction order
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = _grid(tmp_path)
    runs = tmp_path / "runs"
    dirs = _run_dirs(grid, runs)
    (victim,) = [d for d in dirs.values() if "_alphaedit_" in d.name]
    argv = ["--grid", str(grid), "--launcher", "submitit", "--cluster", "local",
            "--max-parallel", "2", "--no-report", "--timeout-min", "10"]

    rc: list[int] = []
    first = threading.Thread(target=lambda: rc.append(main(argv)))
    first.start()
    killed_at, pid = None, None
    deadline = time.monotonic() + 240
    while first.is_alive() and killed_at is None and time.monotonic() < deadline:
        prog = _progress(victim)
        if prog and 1 <= prog["batches_done"] < 10 and _manifest(victim).get("status") \
                == "running":
            pid = int((victim / ".lock").read_text())  # the job process holding the run
            os.kill(pid, signal.SIGKILL)
            killed_at = prog["batches_done"]
        time.sleep(0.01)
    first.join(timeout=300)
    assert killed_at is not None, "the alphaedit job ended before it could be killed"
    assert pid != os.getpid()
    captured = capsys.readouterr()
    assert rc == [2]  # the launcher names the cell that did not complete, in one line
    assert "1 of 3 run(s) did not complete" in captured.err and victim.name in captured.err
    assert "submit the grid again" in captured.err
    assert "warm-up job" in captured.out
    assert _manifest(victim)["status"] == "running"
    for d in dirs.values():
        if d != victim:
            assert _manifest(d)["status"] == "complete", d
            assert _manifest(d)["device"]["concurrent_jobs"] == 2
    # the statistics were computed by the warm-up job, before the alphaedit job took its run
    stats_files = list((cache / "stats").rglob("*.safetensors"))
    assert stats_files
    assert max(f.stat().st_mtime for f in stats_files) < (victim / ".lock").stat().st_mtime

    # the grid submitted again: complete cells skipped, the killed one continued
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("skip (complete)") == 2
    assert f"resumed {victim}" in out
    resumed = _manifest(victim)
    assert resumed["status"] == "complete"
    assert [r["at_batch"] for r in resumed["resumed"]] == [killed_at]

    # the local launcher, in this process, on the same grid: the same records
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--grid", str(grid), "--out", str(tmp_path / "ref"), "--no-report"]) == 0
    finally:
        torch.set_num_threads(threads)
    for run_id, d in dirs.items():
        ref = tmp_path / "ref" / run_id
        assert (d / rec_io.RECORDS).read_bytes() == (ref / rec_io.RECORDS).read_bytes(), run_id
        assert _manifest(d)["summary"] == _manifest(ref)["summary"]

    # keh report over the grid's output folder (which also holds submitit's .submitit/)
    assert (runs / ".submitit").is_dir()
    assert keh_main(["report", str(runs), "--out", str(tmp_path / "report"),
                     "--n-resamples", "50"]) == 0
    assert (tmp_path / "report" / "index.md").exists()


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """``srun`` (submitit only checks it exists) and an ``sbatch`` that keeps each script and
    answers as Slurm does, with job ids 1001, 1002, ..."""
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'n=$(( $(ls "{record}" | wc -l) + 1001 ))\n'
        f'cp "$1" "{record}/$n.sh"\n'
        'echo "Submitted batch job $n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def test_slurm_array_after_warm_job(tmp_path, shared_data, monkeypatch, capsys):
    """What goes to Slurm: the warm-up job, then one array of the pending cells with the
    parallelism cap, partition, GPUs, time limit and a dependency on the warm-up job."""
    record = tmp_path / "sbatch"
    _fake_slurm(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    grid = _grid(tmp_path)
    assert main(["--grid", str(grid), "--launcher", "submitit", "--cluster", "slurm",
                 "--partition", "gpu", "--gpus-per-task", "1", "--max-parallel", "2",
                 "--timeout-min", "90", "--log-dir", str(tmp_path / "logs"),
                 "--no-wait"]) == 0
    out = capsys.readouterr().out
    warm, array = (record / "1001.sh").read_text(), (record / "1002.sh").read_text()
    assert sorted(p.name for p in record.iterdir()) == ["1001.sh", "1002.sh"]
    for script in (warm, array):
        assert "#SBATCH --partition=gpu" in script
        assert "#SBATCH --gpus-per-node=1" in script
        assert "#SBATCH --time=90" in script
        assert str(tmp_path / "logs") in script
    assert "#SBATCH --job-name=keh-warm" in warm and "--array" not in warm
    assert "#SBATCH --job-name=keh-grid" in array
    assert "#SBATCH --array=0-2%2" in array  # three cells, two at once
    assert "#SBATCH --dependency=afterok:1001" in array
    assert "#SBATCH --kill-on-invalid-dep=yes" in array  # a failed warm-up cancels the array
    assert "warm-up job 1001" in out and "job array 1002: 3 run(s)" in out
    assert not (tmp_path / "runs").exists()  # nothing ran here


@pytest.mark.parametrize(("extra", "message"), [
    (["--cluster", "local", "--no-wait"], "--no-wait needs --cluster slurm"),
    (["--jobs", "2"], "--jobs is for --launcher local"),
    (["--cluster", "local", "--max-parallel", "0"], "--max-parallel must be at least 1"),
])
def test_bad_launcher_options(tmp_path, shared_data, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    grid = _grid(tmp_path)
    assert main(["--grid", str(grid), "--launcher", "submitit", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_run_cell_sets_aside_an_incomplete_run_it_cannot_continue(tmp_path, tiny_lm,
                                                                   shared_data, monkeypatch):
    """A killed run whose manifest no longer matches the grid (here: other hparams) is kept
    as ``<run>.stale-1`` and run again, not resumed; a directory killed before its manifest
    was written is started again; a complete one is skipped."""
    from harness.config import RunConfig
    from harness.launch import run_cell

    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    cfg = RunConfig(model="random:llama-tiny", method="ft", n_edits=2, batch_size=1,
                    device="cpu", out_dir=str(tmp_path / "runs"),
                    hparams_overrides={"layers": [1], "steps": 2})
    lines: list[str] = []
    quiet = {"log": lines.append, "lm_for": lambda c: tiny_lm}
    assert run_cell(cfg, **quiet) == "ran"
    run_dir = tmp_path / "runs" / cfg.default_run_id()
    records = (run_dir / rec_io.RECORDS).read_bytes()
    manifest = _manifest(run_dir)
    manifest.update(status="running")
    manifest["hparams"]["layers"] = [2]  # as if killed under an older hparams file
    (run_dir / rec_io.MANIFEST).write_text(json.dumps(manifest))
    assert run_cell(cfg, **quiet) == "ran"
    assert "cannot be continued: hparams (layers: [2] -> [1])" in lines[-2]
    kept = run_dir.with_name(run_dir.name + ".stale-1")
    assert _manifest(kept)["hparams"]["layers"] == [2]
    assert _manifest(run_dir)["status"] == "complete"
    assert (run_dir / rec_io.RECORDS).read_bytes() == records
    assert run_cell(cfg, **quiet) == "skipped"

    empty = RunConfig(**{**cfg.to_dict(), "n_edits": 1})
    (tmp_path / "runs" / empty.default_run_id()).mkdir()  # killed before the manifest
    assert run_cell(empty, **quiet) == "ran"
    assert "killed before it started" in lines[-2]
    assert _manifest(tmp_path / "runs" / empty.default_run_id())["status"] == "complete"
