"""Bad input: one clear line on stderr, exit status 2, nothing written."""

import json
import subprocess
import sys

import pytest

from harness.cli import main
from tests.test_counterfact_loader import KNOWEDIT


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(("args", "needle"), [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--suite", "nosuch"], "unknown suite 'nosuch'"),
    (["--n-edits", "20000"], "run past the 10000 records in"),
    (["--n-edits", "20000"], "use at most --n-edits 10000"),
    (["--start", "9995"], "cases 9995..10004"),
    (["--start", "10000", "--n-edits", "1"], "--start must be below 10000"),
    (["--n-edits", "0"], "--n-edits must be at least 1"),
    (["--method", "ft", "--set", "bogus=1"], "unknown hyperparameter(s) bogus"),
    (["--method", "ft", "--set", "lr=fast"], "field 'lr': expected a number"),
])
def test_bad_arguments(tmp_path, capsys, shared_data, args, needle):
    code, err = _run(["run", "--out", str(tmp_path / "runs"), *args], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("keh: error:") and needle in err[0]
    assert not (tmp_path / "runs").exists()


def test_unknown_model(tmp_path, capsys, shared_data):
    code, err = _run(["run", "--model", "no-such-model-xyz", "--n-edits", "1",
                      "--out", str(tmp_path)], capsys)
    assert code == 2 and "could not load model 'no-such-model-xyz'" in err[-1]


def test_bad_data_names_record_and_field(tmp_path, capsys):
    bad = dict(KNOWEDIT)
    del bad["ground_truth"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([KNOWEDIT, bad]))
    code, err = _run(["run", "--data", str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err == [f"keh: error: {path}, record 1, field 'ground_truth': missing"]


def test_subject_absent(tmp_path, capsys):
    bad = dict(KNOWEDIT, subject="Nobody")
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([bad]))
    code, err = _run(["run", "--data", str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "record 0" in err[0] and "'Nobody' does not occur" in err[0]


def test_console_entry_point_exit_status(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "run", "--method", "nosuch"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("keh: error: unknown method")
    assert "Traceback" not in out.stderr


def _finished_run(tmp_path, capsys) -> str:
    """A complete 1-case noop run on the tiny random model (in this process)."""
    run_dir = tmp_path / "runs" / "r"
    assert main(["run", "--model", "random:llama-tiny", "--n-edits", "1", "--device", "cpu",
                 "--out", str(tmp_path / "runs"), "--run-id", "r"]) == 0
    capsys.readouterr()
    return str(run_dir)


def test_resume_bad_directories(tmp_path, capsys, shared_data):
    code, err = _run(["run", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and err == [f"keh: error: --resume {tmp_path / 'nope'}: no such run "
                                 f"directory"]
    code, err = _run(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "no manifest.json there" in err[0]
    (tmp_path / "manifest.json").write_text('{"status": "running", ')
    code, err = _run(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "manifest.json is not valid JSON" in err[0]
    (tmp_path / "manifest.json").write_text('{"status": "running"}')
    code, err = _run(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "manifest.json lacks config, config_hash" in err[0]


def test_resume_refuses_complete_runs_and_run_flags(tmp_path, capsys, shared_data, tiny_lm):
    run_dir = _finished_run(tmp_path, capsys)
    code, err = _run(["run", "--resume", run_dir], capsys)
    assert code == 2 and err == [f"keh: error: --resume {run_dir}: the run is already "
                                 f"complete; nothing to resume"]
    code, err = _run(["run", "--resume", run_dir, "--n-edits", "5", "--set", "lr=1"], capsys)
    assert code == 2 and len(err) == 1
    assert "config from its manifest; drop --n-edits, --set" in err[0]
    code, err = _run(["run", "--allow-revision-change", "--out", str(tmp_path)], capsys)
    assert code == 2 and err == ["keh: error: --allow-revision-change only applies with "
                                 "--resume"]


def test_set_with_invalid_yaml_says_how_to_quote(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--method", "rome", "--set", "layers=[a"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("keh run: error: argument --set: --set 'layers=[a': the value is not "
                           "valid YAML (expected ',' or ']'") and "--set 'layers=[4, 5]'" in last
