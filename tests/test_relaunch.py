"""A grid launched again over its own run directories (issue 31): a run still going in another
process is left alone (one line, nothing read, renamed or written); whatever is set aside is
kept whole; a manifest cut short is one line, not a traceback; a run made by other code is
run again."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import records as rec_io
from harness.benchmark import load_grid, main
from harness.config import RunConfig
from harness.errors import UserError
from harness.launch import run_cell
from harness.records import code_changed
from tests.test_concurrency import held_elsewhere, killed

ROOT = Path(__file__).resolve().parent.parent

def _runs_lines(out: str) -> list[str]:
    """The lines of the grid's output about its runs (not its progress lines)."""
    return [x for x in out.splitlines() if not x.startswith("grid: ")]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def data(tmp_path: Path, shared_data: Path, monkeypatch) -> Path:
    """A private data directory (its CounterFact file may be changed)."""
    root = tmp_path / "data"
    shutil.copytree(shared_data / "counterfact", root / "counterfact")
    monkeypatch.setenv("KEH_DATA_DIR", str(root))
    return root


def _cfg(tmp_path: Path, **kw: Any) -> RunConfig:
    return RunConfig(**{"model": "random:llama-tiny", "method": "noop", "n_edits": 4,
                        "batch_size": 1, "sequential": True, "device": "cpu", "answer_tokens": 0,
                        "data": "counterfact/counterfact-val.json",
                        "out_dir": str(tmp_path / "runs"), **kw})


def _grid(tmp_path: Path, n_edits: int) -> tuple[Path, RunConfig]:
    """A grid file of one noop cell on the tiny model, and that cell's config."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "models": ["random:llama-tiny"], "methods": ["noop"], "suites": ["counterfact"],
        "data": "counterfact/counterfact-val.json", "n_edits": n_edits, "batch_size": 1,
        "sequential": True, "out_dir": str(tmp_path / "runs"), "device": "cpu"}))
    (cfg,) = load_grid(str(grid))[0].configs()
    return grid, cfg


def _change(data: Path) -> None:
    """Change the CounterFact file on disk (a case no run here uses)."""
    path = data / "counterfact" / "counterfact-val.json"
    records = json.loads(path.read_text())
    records[-1]["target_new"] += " (changed)"
    path.write_text(json.dumps(records))


@pytest.mark.parametrize("state", ["killed, its data changed since", "killed, unchanged",
                                   "started, no manifest yet"])
def test_run_cell_leaves_a_live_run_alone(tmp_path, tiny_lm, data, monkeypatch, state):
    """Before: a changed data file set the live run aside and started the run again under
    its name (the live process then wrote into the new directory: 32 records for 16 cases);
    an unchanged one raised 'in use' and stopped the grid; a directory without manifest was
    deleted."""
    cfg = _cfg(tmp_path)
    if state.startswith("killed"):
        run_dir = killed(cfg, tiny_lm, monkeypatch)
        if "changed since" in state:
            _change(data)
    else:
        run_dir = Path(cfg.out_dir) / cfg.default_run_id()
        run_dir.mkdir(parents=True)
    lines: list[str] = []
    with held_elsewhere("run", run_dir) as pid:
        before = _tree(tmp_path / "runs")
        assert run_cell(cfg, log=lines.append, lm_for=lambda c: tiny_lm) == "busy"
        assert _tree(tmp_path / "runs") == before
    assert lines == [f"left alone: {run_dir} is in use by another keh process (pid {pid}) "
                     f"(a run still going); launch the grid again once it has finished"]


def test_grid_relaunch_over_a_live_run(tmp_path, tiny_lm, data, monkeypatch, capsys):
    """The issue's reproduction, with the live run's process replaced by one holding its
    lock: the relaunch prints one line for the cell and ends with exit 2 and one error line;
    the run directory is exactly as it was."""
    grid, cfg = _grid(tmp_path, n_edits=4)
    run_dir = killed(cfg, tiny_lm, monkeypatch)
    _change(data)
    with held_elsewhere("run", run_dir) as pid:
        before = _tree(tmp_path / "runs")
        capsys.readouterr()
        assert main(["--grid", str(grid), "--no-report"]) == 2
        assert _tree(tmp_path / "runs") == before
    out, err = capsys.readouterr()
    assert _runs_lines(out) == [f"[1/1] left alone: {run_dir} is in use by another keh "
                                f"process (pid {pid}) (a run still going); launch the grid "
                                f"again once it has finished"]
    assert err.splitlines() == [f"keh: error: run(s) {run_dir} did not complete here (see "
                                f"above); launch the grid again to continue them (a run "
                                f"still going in another process is left alone)"]


def test_set_aside_keeps_everything(tmp_path, tiny_lm, data):
    """A directory without a manifest used to be deleted (shutil.rmtree); now one holding
    anything but its lock and the temporary files of a killed start is set aside whole."""
    cfg = _cfg(tmp_path, n_edits=1)
    run_dir = Path(cfg.out_dir) / cfg.default_run_id()
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("my notes")
    (run_dir / ".lock").write_text("")
    lines: list[str] = []
    assert run_cell(cfg, log=lines.append, lm_for=lambda c: tiny_lm) == "ran"
    kept = run_dir.with_name(run_dir.name + ".stale-1")
    tree = _tree(kept)
    assert sorted(tree) == [".lock", "notes.txt"] and tree["notes.txt"] == b"my notes"
    assert lines[0] == (f"{run_dir} holds files but no manifest.json (a start killed early, "
                        f"or not a run); kept as {kept}, starting the run again")
    assert json.loads((run_dir / rec_io.MANIFEST).read_text())["status"] == "complete"

    # a start killed while writing its manifest: only the lock and that temporary file
    other = _cfg(tmp_path, n_edits=2)
    run_dir = Path(other.out_dir) / other.default_run_id()
    run_dir.mkdir()
    (run_dir / ".manifest.json.k2j3h4g5.tmp").write_text('{"run_id": ')
    assert run_cell(other, log=lines.append, lm_for=lambda c: tiny_lm) == "ran"
    assert lines[-2] == f"run {run_dir} was killed before it started; starting it again"
    assert not list(run_dir.glob(".*.tmp"))
    assert not run_dir.with_name(run_dir.name + ".stale-1").exists()


def test_a_file_where_the_run_directory_goes(tmp_path, data):
    """Used to be a NotADirectoryError traceback from shutil.rmtree."""
    cfg = _cfg(tmp_path, n_edits=1)
    path = Path(cfg.out_dir) / cfg.default_run_id()
    path.parent.mkdir(parents=True)
    path.write_text("mine")
    with pytest.raises(UserError) as exc:
        run_cell(cfg, log=lambda s: None)
    assert str(exc.value) == (f"{path} is a file where the grid keeps this run's directory; "
                              f"move it away, then launch the grid again")
    assert path.read_text() == "mine"


def test_truncated_manifest_on_relaunch(tmp_path, tiny_lm, data, capsys):
    """Before: a JSONDecodeError traceback from benchmark.is_complete. Now one line; the run
    is kept as it is and run again."""
    grid, cfg = _grid(tmp_path, n_edits=2)
    assert main(["--grid", str(grid), "--no-report"]) == 0
    run_dir = Path(cfg.out_dir) / cfg.default_run_id()
    manifest = run_dir / rec_io.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:100])
    with pytest.raises(json.JSONDecodeError) as why:
        json.loads(manifest.read_bytes())
    before = _tree(run_dir)
    capsys.readouterr()
    assert main(["--grid", str(grid), "--no-report"]) == 0
    out, err = capsys.readouterr()
    kept = run_dir.with_name(run_dir.name + ".stale-1")
    assert _runs_lines(out)[0] == (
        f"[1/1] {manifest} is not valid JSON ({why.value}); the run is kept as {kept}, "
        f"running again")
    assert "Traceback" not in err
    assert _tree(kept) == before
    assert json.loads(manifest.read_text())["status"] == "complete"


def test_complete_run_of_other_code_is_run_again(tmp_path, tiny_lm, data):
    """stale() used to ignore the code revision: a run made by other code was skipped."""
    cfg = _cfg(tmp_path, n_edits=1)
    lines: list[str] = []
    quiet = {"log": lines.append, "lm_for": lambda c: tiny_lm}
    assert run_cell(cfg, **quiet) == "ran"
    assert run_cell(cfg, **quiet) == "skipped"  # same commit
    run_dir = Path(cfg.out_dir) / cfg.default_run_id()
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    now = manifest["git"]["commit"]
    manifest["git"]["commit"] = "0" * 40  # a commit this checkout does not know
    (run_dir / rec_io.MANIFEST).write_text(json.dumps(manifest))
    assert run_cell(cfg, **quiet) == "ran"
    kept = run_dir.with_name(run_dir.name + ".stale-1")
    assert lines[-2] == (f"{run_dir} is complete but stale: code (git commit {'0' * 40} in "
                         f"the manifest, {now} now, with changes to harness/, methods/ or "
                         f"suites/ between them); kept as {kept}, running again")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_code_changed_between_commits(tmp_path):
    """Only the code and hparams count: grid files and prose do not."""
    repo = tmp_path / "repo"
    for name in ("harness/grids", "methods/hparams", "suites", "docs"):
        (repo / name).mkdir(parents=True)
    (repo / "harness" / "x.py").write_text("A = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "harness" / "grids" / "g.yaml").write_text("models: [m]\n")
    (repo / "methods" / "hparams" / "README.md").write_text("why\n")
    (repo / "docs" / "DESIGN.md").write_text("how\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "prose and grids")
    prose = _git(repo, "rev-parse", "HEAD")
    (repo / "methods" / "hparams" / "m.yaml").write_text("layers: [1]\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "hparams")
    hparams = _git(repo, "rev-parse", "HEAD")
    assert not code_changed(first, first, repo)
    assert not code_changed(first, prose, repo)
    assert code_changed(prose, hparams, repo)
    assert code_changed(first, "f" * 40, repo)  # unknown to git: cannot tell
    assert code_changed(None, first, repo)
