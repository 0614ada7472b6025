"""Half-written and damaged files (issues 19 and 20): an empty or malformed hash memo, a
corrupted or truncated statistics file, an altered downstream cache file, a full disk during a
checkpoint. Each is detected, warned about or refused in one line, and never used."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import checkpoint as ckpt
from harness import models, stats
from harness import records as rec_io
from harness.cli import main
from suites import downstream

# ------------------------------------------------------------------------------ hash memos


def _memo_path(cache: Path, path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache / "hashes" / f"{key}.txt"


@pytest.fixture
def memo_cache(tmp_path, monkeypatch, tiny_lm) -> tuple[Path, Path, str]:
    """A private cache whose models/ holds the converted SmolLM2 (a link to the session's, so
    nothing is converted again) and an unrelated model directory that must survive."""
    gguf = models._smollm2_gguf()
    digest = models._hash_marker(gguf)  # the session cache's (correct) memo
    shared = models.cache_dir() / "models" / digest
    assert (shared / ".complete").exists()
    cache = tmp_path / "cache"
    (cache / "models" / "other-model").mkdir(parents=True)
    (cache / "models" / "other-model" / "config.json").write_text("{}")
    (cache / "models" / digest).symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("KEH_CACHE", str(cache))
    return cache, gguf, digest


@pytest.mark.parametrize("planted", ["", "\n", "not-a-digest", "0" * 63])
def test_damaged_memo_is_treated_as_absent(memo_cache, planted):
    cache, gguf, digest = memo_cache
    memo = _memo_path(cache, gguf)
    memo.parent.mkdir(parents=True)
    memo.write_text(planted)  # what a disk-full (or worse) leaves behind
    assert models._hash_marker(gguf) == digest
    assert memo.read_text() == digest  # rewritten, atomically, with the real digest
    assert models.load_tokenizer_for_random() is not None
    assert (cache / "models" / "other-model" / "config.json").exists()
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted(
        [digest, "other-model"])


def test_run_after_emptying_every_memo(memo_cache, tmp_path, capsys, shared_data):
    """The issue's reproduction: empty every memo, then a run of the built-in model. It used
    to delete $KEH_CACHE/models and record model.sha256 = ''."""
    cache, gguf, digest = memo_cache
    models._hash_marker(gguf)
    for memo in (cache / "hashes").glob("*.txt"):
        memo.write_text("")
    out = tmp_path / "runs"
    assert main(["run", "--model", "smollm2-135m", "--device", "cpu", "--n-edits", "1",
                 "--out", str(out), "--run-id", "r"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "r" / rec_io.MANIFEST).read_text())
    assert manifest["model"]["sha256"] == digest
    assert (cache / "models" / "other-model" / "config.json").exists()
    assert (cache / "models" / digest / ".complete").exists()


def test_convert_refuses_a_non_digest(memo_cache):
    cache, gguf, _ = memo_cache
    with pytest.raises(ValueError, match="is not a SHA-256 digest"):
        models._convert_gguf(gguf, "")
    assert (cache / "models" / "other-model" / "config.json").exists()


# ------------------------------------------------------------------------------ stats cache


def test_damaged_statistics_file_is_recomputed(tiny_lm, tmp_path, monkeypatch):
    """A statistics file altered with its header intact (content hash mismatch), then one cut
    short: each is warned about, recomputed and rewritten, never used."""
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    kw: dict[str, Any] = dict(n_tokens=2000, seq_len=64, show_progress=False)
    first = stats.second_moment_stats(tiny_lm, [1], **kw)
    assert first.computed == [1]
    path = first.paths[1]
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-8:] = bytes(8)  # the last two float32 of C0; header and length unchanged
    path.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match="does not match its content hash"):
        again = stats.second_moment_stats(tiny_lm, [1], **kw)
    assert again.computed == [1] and torch.equal(again.C0[1], first.C0[1])
    assert stats.second_moment_stats(tiny_lm, [1], **kw).computed == []  # rewritten, intact
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(UserWarning, match="unreadable cache file"):
        third = stats.second_moment_stats(tiny_lm, [1], **kw)
    assert third.computed == [1] and torch.equal(third.C0[1], first.C0[1])
    assert stats.second_moment_stats(tiny_lm, [1], **kw).computed == []


# ------------------------------------------------------------------------------ downstream cache


def test_altered_downstream_cache_is_measured_again(tiny_lm, shared_data, tmp_path):
    cache = tmp_path / "downstream"
    scores, path = downstream.evaluate_unedited(tiny_lm, ["sst2"], shared_data, cache, limit=2)
    stored = json.loads(path.read_text())
    assert stored["sha256"]
    stored["scores"]["sst2"]["acc"] = 0.987  # valid JSON, right key, wrong content
    path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="content hash does not match"):
        again, _ = downstream.evaluate_unedited(tiny_lm, ["sst2"], shared_data, cache, limit=2)
    assert again == scores
    assert json.loads(path.read_text())["scores"] == scores


# ------------------------------------------------------------------------------ full disk


def test_disk_full_during_a_checkpoint(tmp_path, capsys, shared_data, monkeypatch):
    """The third checkpoint's tensor file hits ENOSPC half-written: one line, exit 2; the run
    then resumes from its last good checkpoint to the records of an uninterrupted run."""
    argv = ["run", "--model", "random:llama-tiny", "--device", "cpu", "--n-edits", "4",
            "--batch-size", "1", "--run-id", "r"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    real, calls = ckpt.save_tensors, {"n": 0}

    def full_disk(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensors)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_tensors", full_disk)
        capsys.readouterr()
        code = main([*argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    run_dir = tmp_path / "runs" / "r"
    assert code == 2 and err[-1].startswith("keh: error: writing the run failed: No space "
                                            "left on device")
    assert f"--resume {run_dir}" in err[-1] and not any("Traceback" in e for e in err)
    progress = json.loads((run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS).read_text())
    assert progress["batches_done"] == 2
    assert main(["run", "--resume", str(run_dir)]) == 0
    ref = tmp_path / "ref" / "r"
    assert (run_dir / rec_io.RECORDS).read_bytes() == (ref / rec_io.RECORDS).read_bytes()
    assert not list((run_dir / ckpt.CHECKPOINT_DIR).glob("*.tmp"))
