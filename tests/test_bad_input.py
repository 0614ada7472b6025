"""Bad input, one class at a time: exit status 2, exactly one ``keh: error:`` line that names
what is wrong, no traceback, and nothing written (issue 19)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.cli import main
from harness.config import RunConfig
from harness.runner import run
from tests.test_counterfact_loader import KNOWEDIT

TINY = ["--model", "random:llama-tiny", "--device", "cpu", "--n-edits", "1"]


def _fails(argv: list[str], capsys, needle: str) -> str:
    """Run the CLI in this process; assert exit 2 and one error line holding ``needle``."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("keh: error:")]
    assert code == 2, err
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert not any("Traceback" in line for line in err), err
    assert needle in errors[0], errors[0]
    return errors[0]


def _data(tmp_path: Path, record: dict | None = None, encoding: str = "utf-8") -> Path:
    path = tmp_path / "cf.json"
    path.write_bytes(json.dumps([record or KNOWEDIT], ensure_ascii=False).encode(encoding))
    return path


# ------------------------------------------------------------------------------ data and lengths

def test_latin1_data_file(tmp_path, capsys):
    path = _data(tmp_path, dict(KNOWEDIT, target_new="Français"), encoding="latin-1")
    out = tmp_path / "runs"
    line = _fails(["run", *TINY, "--data", str(path), "--out", str(out)], capsys,
                  f"{path}: not UTF-8 text")
    assert "iconv" in line
    assert not out.exists()


@pytest.mark.parametrize(("field", "record_field"), [
    ("paraphrase_prompts[0]", "rephrase_prompt"),
    ("neighborhood_prompts[0]", "locality_prompt"),
])
def test_prompt_longer_than_context(tmp_path, capsys, field, record_field):
    """random:gpt2-tiny has 256 positions; a 400-word prompt used to be an IndexError deep in
    the embedding, even for the noop method."""
    long = "Danielle Darrieux " + "really " * 400 + "speaks"
    path = _data(tmp_path, dict(KNOWEDIT, **{record_field: long}))
    out = tmp_path / "runs"
    line = _fails(["run", "--model", "random:gpt2-tiny", "--device", "cpu", "--n-edits", "1",
                   "--data", str(path), "--out", str(out)], capsys,
                  f"{path}, record 0 (case 7), field '{field}'")
    assert "context of 256 tokens" in line
    assert not out.exists()


# ------------------------------------------------------------------------------ devices, tasks

@pytest.mark.parametrize(("device", "needle"), [
    ("banana", "--device 'banana': unknown device; use one of auto, cpu, cuda"),
    ("cuda", "--device cuda: CUDA is not available on this machine"),
    ("cuda:7", "--device cuda:7: CUDA is not available"),
    ("meta", "unsupported device type 'meta'"),
])
def test_bad_device(tmp_path, capsys, device, needle):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "runs"
    _fails(["run", "--model", "random:llama-tiny", "--device", device, "--n-edits", "1",
            "--out", str(out)], capsys, needle)
    assert not out.exists()


def test_unknown_downstream_task_online(tmp_path, capsys, monkeypatch, shared_data):
    """With the network allowed, an unknown name used to reach lm-eval (KeyError)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "runs"
    line = _fails(["run", *TINY, "--downstream", "sst2,nosuchtask", "--out", str(out)], capsys,
                  "--downstream: unknown task(s) nosuchtask")
    assert "sst2, mrpc, cola, rte, nli, mmlu" in line
    assert not out.exists()


# ------------------------------------------------------------------------------ output paths

def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    _fails(["run", *TINY, "--out", str(target)], capsys, f"{target} is a file")
    _fails(["run", *TINY, "--out", str(target / "sub")], capsys, f"{target} is a file")
    assert target.read_text() == "x"


def test_out_is_dev_null(capsys):
    _fails(["run", *TINY, "--out", "/dev/null"], capsys, "--out /dev/null: /dev/null is not a "
           "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_is_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _fails(["run", *TINY, "--out", str(ro / "runs")], capsys, f"directory {ro} is not "
               f"writable")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("run_id", ["..", "."])
def test_run_id_cannot_escape_out(tmp_path, capsys, run_id):
    out = tmp_path / "runs"
    out.mkdir()
    _fails(["run", *TINY, "--out", str(out), "--run-id", run_id], capsys,
           f"--run-id {run_id!r} must name a directory inside --out")
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


def test_run_id_that_is_a_symlink_out(tmp_path, capsys):
    out, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "r").symlink_to(elsewhere, target_is_directory=True)
    _fails(["run", *TINY, "--out", str(out), "--run-id", "r"], capsys, "resolves outside --out")
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------------------ hparams

@pytest.mark.parametrize(("sets", "needle"), [
    (["layers=[9]"], "field 'layers': layer(s) [9] outside 0..3 (random:llama-tiny has 4"),
    (["layers=[-1]"], "field 'layers' = [-1]: must be >= 0"),
    (["v_lr=nan"], "field 'v_lr' = nan: must be a finite number > 0"),
    (["v_lr=inf"], "field 'v_lr' = inf: must be a finite number > 0"),
    (["L2=nan"], "field 'L2' = nan: must be a finite number >= 0"),
    (["L2=-inf"], "field 'L2' = -inf: must be a finite number >= 0"),
    (["L2=-1"], "field 'L2' = -1.0: must be >= 0"),
    (["clamp_norm_factor=nan"], "field 'clamp_norm_factor' = nan: must be a finite number > 0"),
    (["clamp_norm_factor=-2"], "field 'clamp_norm_factor' = -2.0: must be > 0"),
    (["nullspace_threshold=inf"], "field 'nullspace_threshold' = inf"),
    (["nullspace_threshold=-0.01"], "field 'nullspace_threshold' = -0.01: must be >= 0"),
    (["kl_factor=nan"], "field 'kl_factor' = nan: must be a finite number >= 0"),
    (["kl_factor=-1"], "field 'kl_factor' = -1.0: must be >= 0"),
    (["v_weight_decay=-0.5"], "field 'v_weight_decay' = -0.5: must be >= 0"),
    (["n_context=-1"], "field 'n_context' = -1: must be >= 0"),
    (["stats_seq_len=1"], "field 'stats_seq_len' = 1: must be >= 2"),
])
def test_alphaedit_hparams_ranges(tmp_path, capsys, sets, needle):
    out = tmp_path / "runs"
    argv = ["run", *TINY, "--method", "alphaedit", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    _fails(argv, capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize(("sets", "needle"), [
    (["weight_decay=-1"], "field 'weight_decay' = -1.0: must be >= 0"),
    (["lr=nan"], "field 'lr' = nan: must be a finite number > 0"),
    (["layers=[4]"], "layer(s) [4] outside 0..3"),
])
def test_ft_hparams_ranges(tmp_path, capsys, sets, needle):
    out = tmp_path / "runs"
    argv = ["run", *TINY, "--method", "ft", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    _fails(argv, capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "is empty; give a mapping of hyperparameters"),
    (b"# only a comment\n", "is empty; give a mapping of hyperparameters"),
    (b"- 1\n- 2\n", "expected a mapping of hyperparameters (field: value), got a list"),
    (b"42\n", "expected a mapping of hyperparameters (field: value), got a int"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
    (b"layers: [1, 2\nlr: 3\n", "not valid YAML at line"),
    (b"layers: [1]\nlr: 0.5\nlayers: [2]\n",  # last value used to win, silently
     "not valid YAML at line 3, column 1: duplicate key 'layers' (first at line 1); keep one"),
])
def test_bad_hparams_file(tmp_path, capsys, content, needle):
    path = tmp_path / "hp.yaml"
    path.write_bytes(content)
    out = tmp_path / "runs"
    line = _fails(["run", *TINY, "--method", "ft", "--hparams", str(path), "--out", str(out)],
                  capsys, needle)
    assert f"hparams file {path}" in line
    assert not out.exists()


def test_hparams_file_is_a_directory(tmp_path, capsys):
    out = tmp_path / "runs"
    _fails(["run", *TINY, "--method", "ft", "--hparams", str(tmp_path), "--out", str(out)],
           capsys, f"hparams file {tmp_path} is not a file")
    assert not out.exists()


# ------------------------------------------------------------------------------ resume

def _interrupted(tmp_path: Path, tiny_lm) -> Path:
    """A finished 4-case noop run (2 batches) turned back into an interrupted one."""
    cfg = RunConfig(model="random:llama-tiny", method="noop", suite="counterfact", n_edits=4,
                    batch_size=2, device="cpu", out_dir=str(tmp_path / "runs"), run_id="r")
    run_dir = run(cfg, lm=tiny_lm, log=lambda s: None)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    manifest["status"] = "running"
    rec_io.write_json(run_dir / rec_io.MANIFEST, manifest)
    return run_dir


def _edit_progress(run_dir: Path, **changes) -> None:
    path = run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("changes", "needle"), [
    ({"tensors": "/etc/passwd"}, "tensor file '/etc/passwd' is not a checkpoint file name"),
    ({"tensors": "../../../../etc/passwd"}, "is not a checkpoint file name"),
    ({"batches_done": -1}, "batches_done = -1, expected an integer in 0..2"),
    ({"batches_done": 7}, "batches_done = 7, expected an integer in 0..2"),
    ({"batches_done": 1}, "records_lines = 4, expected an integer in 2..2"),
    ({"records_lines": 3}, "records_lines = 3, expected an integer in 4..4"),
    ({"pending": [{"index": 0}]}, "a batch-mode run has sequential progress"),
])
def test_resume_refuses_an_edited_checkpoint(tmp_path, tiny_lm, capsys, changes, needle):
    run_dir = _interrupted(tmp_path, tiny_lm)
    records = (run_dir / rec_io.RECORDS).read_bytes()
    _edit_progress(run_dir, **changes)
    _fails(["run", "--resume", str(run_dir)], capsys, needle)
    assert (run_dir / rec_io.RECORDS).read_bytes() == records


def test_resume_refuses_a_truncated_records_line(tmp_path, tiny_lm, capsys):
    run_dir = _interrupted(tmp_path, tiny_lm)
    path = run_dir / rec_io.RECORDS
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][: len(lines[1]) // 2]
    path.write_bytes(b"\n".join(lines))
    _fails(["run", "--resume", str(run_dir)], capsys, f"{path}: its first 4 lines differ")
    _edit_progress(run_dir, records_sha256=None)  # a checkpoint from before the hashes
    _fails(["run", "--resume", str(run_dir)], capsys, f"{path}, line 2: not a complete JSON "
           f"record")


def test_resume_refuses_a_records_file_outside(tmp_path, tiny_lm, capsys):
    run_dir = _interrupted(tmp_path, tiny_lm)
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes((run_dir / rec_io.RECORDS).read_bytes())
    (run_dir / rec_io.RECORDS).unlink()
    (run_dir / rec_io.RECORDS).symlink_to(outside)
    _fails(["run", "--resume", str(run_dir)], capsys, "points outside the run directory")
    # the control for every refusal above: the same directory, put back, resumes
    records = outside.read_bytes()
    (run_dir / rec_io.RECORDS).unlink()
    (run_dir / rec_io.RECORDS).write_bytes(records)
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert (run_dir / rec_io.RECORDS).read_bytes() == records
    assert json.loads((run_dir / rec_io.MANIFEST).read_text())["status"] == "complete"
