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
    (["--n-edits", "20000"], "exceeds the 10000 records"),
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
