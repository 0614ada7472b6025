"""Every registered method still runs end to end: the ``smoke`` grid (every method on
CounterFact with downstream tasks and on zsRE), cut to one edit per run, on the real SmolLM2.
``nox -s smoke`` runs the whole grid (10 edits per run)."""

from __future__ import annotations

import json

import pytest

from harness import benchmark
from harness.grid import load_grid
from methods import METHODS


@pytest.mark.slow
def test_every_method_runs_the_smoke_grid(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    out = tmp_path / "runs"
    assert benchmark.main(["--grid", "smoke", "--n-edits", "1", "--out", str(out),
                           "--no-report"]) == 0
    cells = {(c.method, c.suite) for g in load_grid("smoke") for c in g.configs()}
    assert {m for m, _ in cells} == set(METHODS)
    done = {}
    for manifest in out.glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        done[(m["method"], m["config"]["suite"])] = (m["status"], m["summary"]["n_failed"],
                                                     m["config"]["n_edits"])
    assert done == {cell: ("complete", 0, 1) for cell in cells}
    table = capsys.readouterr().out
    for method in METHODS:
        assert f"| {method} [faithful]" in table, method
