"""``python -m harness.benchmark``: grids, --jobs workers, filters, skipping complete runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.benchmark import load_grid, main


def write_grid(tmp_path: Path) -> Path:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "models": ["random:llama-tiny"], "methods": ["noop", "ft"], "suites": ["counterfact"],
        "data": "counterfact/counterfact-val.json",  # relative to the data dir
        "hparams_overrides": {"ft": {"layers": [1], "steps": 2}},
        "seeds": [0], "n_edits": 2, "batch_size": 2, "sequential": True,
        "out_dir": str(tmp_path / "runs"), "report_dir": str(tmp_path / "report"),
        "device": "cpu", "downstream": ["sst2"], "downstream_limit": 3}))
    return grid


def manifests(tmp_path: Path) -> dict[str, dict]:
    out = {}
    for m in (tmp_path / "runs").glob("*/manifest.json"):
        d = json.loads(m.read_text())
        out[d["method"]] = d
    return out


def test_jobs_run_every_config_in_workers_then_reruns_skip(tmp_path, shared_data, monkeypatch,
                                                           capsys):
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    grid = write_grid(tmp_path)
    assert main(["--grid", str(grid), "--jobs", "2", "--no-report"]) == 0
    ms = manifests(tmp_path)
    assert sorted(ms) == ["ft", "noop"]
    for m in ms.values():
        assert m["status"] == "complete"
        assert m["device"]["concurrent_jobs"] == 2  # timings shared the device
        assert m["data"]["path"].endswith("counterfact/counterfact-val.json")
    # the unedited downstream scores were measured once, by the parent before the workers
    # started, and read by both runs
    runs = [tmp_path / "runs" / m["run_id"] for m in ms.values()]
    cached = [json.loads((d / "curve.jsonl").read_text().splitlines()[0])["downstream_cache"]
              for d in runs]
    assert cached[0] == cached[1] and cached[0].startswith(str(tmp_path / "cache"))
    assert Path(cached[0]).stat().st_mtime <= min((d / "records.jsonl").stat().st_mtime
                                                  for d in runs)
    ids = {k: m["data"]["case_ids"] for k, m in ms.items()}
    val = json.loads((shared_data / "counterfact" / "counterfact-val.json").read_text())
    assert ids["ft"] == ids["noop"] == [str(r["case_id"]) for r in val[:2]]
    capsys.readouterr()
    # a second pass finds both runs complete and only builds the report
    assert main(["--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert out.count("skip (complete)") == 2 and (tmp_path / "report" / "index.md").exists()


def test_filters_and_unknown_method(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    grid = write_grid(tmp_path)
    assert main(["--grid", str(grid), "--methods", "ft", "--seeds", "0", "--no-report"]) == 0
    assert sorted(manifests(tmp_path)) == ["ft"]
    assert main(["--grid", str(grid), "--seeds", "1", "--no-report"]) == 0  # nothing to run
    assert main(["--grid", str(grid), "--methods", "rome", "--no-report"]) == 2
    assert "--methods: ['rome'] not in grid" in capsys.readouterr().err


def test_shipped_grids_load():
    from harness.grid import GRIDS

    for name in sorted(p.stem for p in GRIDS.glob("*.yaml")):
        configs = [c for g in load_grid(name) for c in g.configs()]
        assert configs, name
        assert len({c.default_run_id() for c in configs}) == len(configs), name
        for c in configs:
            c.validate()
    # issue 17's protocol: CounterFact 2,000 and zsRE 1,000 edits in sequential batches of 100,
    # 3 seeds, a curve every 5 batches; the stream: 10,000 edits, a curve every 10 batches
    paper = [c for g in load_grid("paper-smollm2") for c in g.configs()]
    assert {(c.suite, c.n_edits) for c in paper} == {("counterfact", 2000), ("zsre", 1000)}
    assert {c.batch_size for c in paper} == {100} and all(c.sequential for c in paper)
    assert {c.seed for c in paper} == {0, 1, 2} and {c.eval_every for c in paper} == {5}
    stream = [c for g in load_grid("stream-smollm2") for c in g.configs()]
    assert {(c.method, c.n_edits, c.eval_every) for c in stream} == {
        ("alphaedit", 10000, 10), ("memit", 10000, 10), ("metake", 10000, 10)}
    # the comparison grids leave no registered method out (noop: the paper grids' runs carry
    # their own unedited reference)
    from methods import METHODS

    for name, expected in (("smoke", set(METHODS)), ("smollm2-100", set(METHODS)),
                           ("paper-smollm2", set(METHODS) - {"noop"}),
                           ("paper-gemma3", set(METHODS) - {"noop"})):
        for suite in ("counterfact", "zsre") if name != "smollm2-100" else ("counterfact",):
            got = {c.method for g in load_grid(name) for c in g.configs() if c.suite == suite}
            assert got == expected, (name, suite, expected ^ got)
    sweep = [c for g in load_grid("smollm2-sweep") for c in g.configs()]
    assert len({c.default_run_id() for c in sweep}) == len(sweep)  # overrides tell them apart


def test_complete_run_with_other_hparams_is_set_aside_and_rerun(tmp_path, shared_data,
                                                                 monkeypatch, capsys):
    """A changed hparams YAML keeps the config hash; the benchmark must notice from the
    manifest, keep the old run under another name and run again, not skip it."""
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "models": ["random:llama-tiny"], "methods": ["ft"], "suites": ["counterfact"],
        "n_edits": 2, "batch_size": 2, "out_dir": str(tmp_path / "runs"), "device": "cpu",
        "hparams_overrides": {"ft": {"layers": [1], "steps": 2}}}))
    assert main(["--grid", str(grid), "--no-report"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["hparams"]["layers"] == [1]
    manifest["hparams"]["layers"] = [2]  # as if the YAML had said layer 2 back then
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["--grid", str(grid), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "complete but stale: hparams (layers: [2] -> [1])" in out
    assert json.loads((run_dir / "manifest.json").read_text())["hparams"]["layers"] == [1]
    kept = run_dir.with_name(run_dir.name + ".stale-1")
    assert json.loads((kept / "manifest.json").read_text())["hparams"]["layers"] == [2]
    capsys.readouterr()
    assert main(["--grid", str(grid), "--no-report"]) == 0  # now up to date: skipped
    assert "skip (complete)" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "needle"), [
    ("models: [m]\nmethodz: [rome]\nsuites: [zsre]\n", "unknown key(s) methodz (known: models,"),
    ("models: [m]\nmethods: [rome]\n", "missing key(s) suites"),
    ("models: [m]\nmethods: rome\nsuites: [zsre]\n", "methods: expected list[str], got 'rome'"),
    ("models: [m]\nmethods: [rome]\nsuites: [zsre]\nn_edits: ten\n",
     "n_edits: expected int, got 'ten'"),
    ("models: [m]\nmethods: [rome]\nsuites: [zsre]\nsequential: 1\n",
     "sequential: expected bool, got 1"),
    ("models: [m]\nmethods: [rome]\nsuites: [zsre]\nhparams_overrides: {rome: [1]}\n",
     "hparams_overrides: expected dict[str, dict[str, Any]]"),
    ("- models: [m]\n  methods: [rome]\n  suites: [zsre]\n- 3\n",
     "part 2 of 2: expected a mapping of grid keys, got int"),
    ("- models: [m]\n  methods: [rome]\n  suites: [zsre]\n  sequential: false\n"
     "  eval_every: 2\n", "(rome / zsre / seed 0): --eval-every 2 needs --sequential"),
    ("models: [m\n", "not valid YAML (while parsing"),
    ("models: [m]\nmethods: [rome]\nsuites: [zsre]\nmethods: [ft]\n",
     "duplicate key 'methods' (first at line 2); keep one"),
])
def test_bad_grid_is_one_line(tmp_path, capsys, text, needle):
    grid = tmp_path / "bad.yaml"
    grid.write_text(text)
    assert main(["--grid", str(grid), "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keh: error: grid ") and needle in err[0], err
