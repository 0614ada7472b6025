"""Two real processes at once (issue 20): on one run directory (a new start twice, a resume
twice) exactly one proceeds and the other gets one line, exit 2; on one cache key (the same
key statistics) exactly one computes and the other reads its file.

The processes meet at a file barrier after their imports, so they start the contested part
within milliseconds of each other."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import cachefiles
from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.cachefiles import run_lock
from harness.config import RunConfig
from harness.models import cache_dir
from harness.runner import run

ROOT = Path(__file__).resolve().parent.parent

BARRIER = """
import sys, time
from pathlib import Path
import harness.runner, harness.stats  # the slow imports happen before the barrier
barrier, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(barrier / me).touch()
deadline = time.monotonic() + 300
while len(list(barrier.iterdir())) < n and time.monotonic() < deadline:
    time.sleep(0.005)
"""
CLI = BARRIER + "from harness.cli import main\nsys.exit(main(sys.argv[4:]))\n"
STATS = BARRIER + """
import hashlib, json
from harness.models import load_model
from harness.stats import second_moment_stats
lm = load_model("random:llama-tiny", device="cpu", seed=0)
res = second_moment_stats(lm, [1, 2], n_tokens=3000, seq_len=64, show_progress=False)
c0 = b"".join(res.C0[k].cpu().numpy().tobytes() for k in sorted(res.C0))
print(json.dumps({"computed": res.computed, "C0": hashlib.sha256(c0).hexdigest()}))
"""


HOLD = """
import sys
from pathlib import Path
from harness.cachefiles import key_lock, run_lock
kind, path = sys.argv[1], Path(sys.argv[2])
with run_lock(path) if kind == "run" else key_lock(path.parent, [path.stem]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def held_elsewhere(kind: str, path: Path) -> Iterator[int]:
    """Another process holding a lock for the ``with`` block, as a live run (``kind`` "run":
    ``path`` is the run directory) or a process filling a cache entry ("key": ``path`` is
    ``<lock_dir>/<key>.lock``) does; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], cwd=ROOT,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def _env(cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               KEH_CACHE=str(cache or cache_dir()))
    env.setdefault("KEH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return env


def _together(script: str, argvs: list[list[str]], barrier: Path,
              env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Start one process per argv list, all released at once by the barrier; wait for all."""
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(barrier), str(i),
                               str(len(argvs)), *argv], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, argv in enumerate(argvs)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _one_winner(results: list[subprocess.CompletedProcess[str]], needles: tuple[str, ...]
                ) -> None:
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr[-3000:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    lines = loser.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("keh: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert "Traceback" not in loser.stderr
    assert any(n in errors[0] for n in needles), errors[0]


def _case_indices(run_dir: Path) -> list[int]:
    return [r["case_index"] for r in rec_io.read_records(run_dir / rec_io.RECORDS)]


RUN = ["run", "--model", "random:llama-tiny", "--device", "cpu", "--n-edits", "8",
       "--batch-size", "1"]


def test_same_new_run_started_twice(tmp_path, tiny_lm, shared_data):
    """Default run ids are deterministic, so the same command twice names one directory."""
    out = tmp_path / "runs"
    argv = [*RUN, "--out", str(out), "--run-id", "r"]
    results = _together(CLI, [argv, argv], tmp_path / "barrier", _env())
    _one_winner(results, ("is in use by another keh process", "already holds a run"))
    run_dir = out / "r"
    assert _case_indices(run_dir) == list(range(8))
    assert json.loads((run_dir / rec_io.MANIFEST).read_text())["status"] == "complete"


class _Crash(Exception):
    pass


def killed(cfg: RunConfig, lm: Any, monkeypatch) -> Path:
    """The run of ``cfg`` stopped after its second checkpoint (as a kill leaves it); its
    directory."""
    real, calls = ckpt.save, {"n": 0}

    def save(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Crash
        real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save", save)
        with pytest.raises(_Crash):
            run(cfg, lm=lm, log=lambda s: None)
    return Path(cfg.out_dir) / (cfg.run_id or cfg.default_run_id())


def _interrupted(tmp_path: Path, tiny_lm: Any, monkeypatch) -> Path:
    """An 8-case noop run (batches of 1) that crashed after saving 2 batches."""
    cfg = RunConfig(model="random:llama-tiny", method="noop", suite="counterfact", n_edits=8,
                    batch_size=1, device="cpu", out_dir=str(tmp_path / "runs"), run_id="r")
    run_dir = killed(cfg, tiny_lm, monkeypatch)
    assert json.loads((run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS).read_text())[
        "batches_done"] == 2
    return run_dir


def test_same_run_resumed_twice(tmp_path, tiny_lm, shared_data, monkeypatch):
    run_dir = _interrupted(tmp_path, tiny_lm, monkeypatch)
    argv = ["run", "--resume", str(run_dir)]
    results = _together(CLI, [argv, argv], tmp_path / "barrier", _env())
    _one_winner(results, ("is in use by another keh process", "already complete"))
    assert _case_indices(run_dir) == list(range(8))
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    assert manifest["status"] == "complete" and len(manifest["resumed"]) == 1


def test_same_statistics_computed_once(tmp_path, tiny_lm):
    """Two processes needing the same key statistics on one (fresh) cache: one computes both
    layers, the other waits on the key's lock and reads the files; both get the same C0."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shared = cache_dir()  # the converted tokenizer model, loaded by tiny_lm
    for name in ("models", "hashes"):
        if (shared / name).is_dir():
            (cache / name).symlink_to(shared / name, target_is_directory=True)
    results = _together(STATS, [[], []], tmp_path / "barrier", _env(cache))
    assert all(r.returncode == 0 for r in results), [r.stderr[-3000:] for r in results]
    got = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert sorted(g["computed"] for g in got) == [[], [1, 2]]
    assert got[0]["C0"] == got[1]["C0"]
    assert len(list((cache / "stats").glob("*.safetensors"))) == 2


# ------------------------------------------------------------------------------ the run lock


def _free(path: Path) -> bool:
    """Whether no open file holds the flock of ``path`` (tried from a new open file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock just taken
    return True


def test_run_lock_is_reentrant_in_one_process(tmp_path):
    """A grid cell holds its run's lock while it decides, then resumes the run, which takes
    the same lock again: that must pass, and the lock must stay held until the outer block
    ends."""
    with run_lock(tmp_path):
        with run_lock(tmp_path):
            assert not _free(tmp_path / ".lock")
        assert not _free(tmp_path / ".lock")
    assert _free(tmp_path / ".lock")


def test_run_lock_on_a_directory_set_aside_meanwhile(tmp_path, monkeypatch):
    """Between opening ``<run>/.lock`` and locking it, the holder sets the directory aside and
    a new run starts under the name: the lock taken must be the new directory's, not the one
    of the directory now called ``.stale-1`` (whose holder has let it go)."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    real_open, moved = os.open, []

    def open_then_move(path: Any, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if not moved and Path(path) == run_dir / ".lock":
            run_dir.rename(tmp_path / "r.stale-1")
            run_dir.mkdir()
            moved.append(fd)
        return fd

    with monkeypatch.context() as m:
        m.setattr(cachefiles.os, "open", open_then_move)
        with run_lock(run_dir):
            assert moved
            assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
            assert not _free(run_dir / ".lock")
            assert _free(tmp_path / "r.stale-1" / ".lock")
