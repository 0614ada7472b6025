"""Half-written and damaged files (issues 19, 20 and 31): an empty or malformed hash memo, a
corrupted or truncated statistics file, an altered downstream cache file, a failed write during
a checkpoint (from any library), temporary files a kill left behind, a damaged model cache
entry. Each is detected, warned about, repaired or refused in one line, and never used."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

from harness import checkpoint as ckpt
from harness import models, stats
from harness import records as rec_io
from harness.cli import main
from suites import downstream
from tests.test_concurrency import _interrupted, held_elsewhere
from tests.test_resume import ROOT, SEQ_ARGS, _env, _private_cache

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
    with pytest.warns(UserWarning, match=f"ignoring damaged hash memo {memo} .*; hashing the "
                                         f"file again"):
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
    with pytest.warns(UserWarning, match="ignoring damaged hash memo .* \\(empty\\); hashing the "
                                         "file again"):
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


@pytest.mark.parametrize(("error", "message", "named"), [
    (lambda path: OSError(errno.ENOSPC, "No space left on device", path),
     "No space left on device", True),
    # what safetensors raises on a full disk: not an OSError (before: a 28-line traceback)
    (lambda path: SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)"), "No space left on device", False),
    (lambda path: OSError(errno.EIO, "Input/output error"), "Input/output error", False),
    (lambda path: OSError(errno.EROFS, "Read-only file system"), "Read-only file system",
     False),
])
def test_write_error_during_a_checkpoint(tmp_path, capsys, shared_data, monkeypatch, error,
                                         message, named):
    """The third checkpoint's tensor file fails half-written, in the library call: one line
    naming the file where the error does, exit 2; the temporary file is gone, and the run
    resumes from its last good checkpoint to the records of an uninterrupted run."""
    argv = ["run", "--model", "random:llama-tiny", "--device", "cpu", "--n-edits", "4",
            "--batch-size", "1", "--no-generation-eval", "--run-id", "r"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    real, calls = ckpt.save_file, {"n": 0, "path": ""}

    def failing(tensors: dict[str, torch.Tensor], path: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            calls["path"] = path
            Path(path).write_bytes(b"\0" * 100)  # half-written when the error came
            raise error(path)
        real(tensors, path)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_file", failing)
        capsys.readouterr()
        code = main([*argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    run_dir = tmp_path / "runs" / "r"
    assert code == 2 and err[-1] == (
        f"keh: error: writing the run failed: {message} ({calls['path'] if named else run_dir})"
        f"; free space or make the disk writable, then continue from the last checkpoint with "
        f"--resume {run_dir}")
    assert not any("Traceback" in e for e in err)
    assert not list((run_dir / ckpt.CHECKPOINT_DIR).glob(".*.tmp"))  # removed on the way out
    progress = json.loads((run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS).read_text())
    assert progress["batches_done"] == 2
    assert main(["run", "--resume", str(run_dir)]) == 0
    ref = tmp_path / "ref" / "r"
    assert (run_dir / rec_io.RECORDS).read_bytes() == (ref / rec_io.RECORDS).read_bytes()


LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from harness.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_real_safetensors_write_error_is_one_line(tmp_path, tiny_lm, shared_data, monkeypatch):
    """No injection: a process whose files may not grow past 100 kB (RLIMIT_FSIZE) writes the
    first checkpoint's tensors (333 kB) and safetensors itself fails ('File too large (os
    error 27)'). One line, exit 2; resumed without the limit, the records equal an
    uninterrupted run's."""
    cache = _private_cache(tmp_path / "cache")  # its statistics: filled by the reference run
    monkeypatch.setenv("KEH_CACHE", str(cache))
    argv = ["run", "--model", "random:llama-tiny", "--device", "cpu", "--n-edits", "2",
            "--batch-size", "1", *SEQ_ARGS, "--no-generation-eval", "--run-id", "r"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: the same float reduction order
    try:
        assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
        run_dir = tmp_path / "runs" / "r"
        proc = subprocess.run([sys.executable, "-c", LIMITED, "100000", *argv, "--out",
                               str(tmp_path / "runs")], cwd=ROOT, env=_env(cache),
                              capture_output=True, text=True, timeout=600)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert err[-1] == (f"keh: error: writing the run failed: File too large ({run_dir}); "
                           f"free space or make the disk writable, then continue from the "
                           f"last checkpoint with --resume {run_dir}")
        assert "Traceback" not in proc.stderr
        assert main(["run", "--resume", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    ref = tmp_path / "ref" / "r"
    assert (run_dir / rec_io.RECORDS).read_bytes() == (ref / rec_io.RECORDS).read_bytes()


# ------------------------------------------------------------------------------ temp files


def test_temp_files_are_removed_on_resume_and_start(tmp_path, tiny_lm, shared_data,
                                                    monkeypatch):
    """A kill during an atomic write leaves ``.<name>.<random>.tmp`` (a tensor file's is the
    size of the edited matrices); the resume used to keep them (it globbed names without the
    leading dot). Only those names go; anything else stays."""
    run_dir = _interrupted(tmp_path, tiny_lm, monkeypatch)
    cdir = run_dir / ckpt.CHECKPOINT_DIR
    ours = [cdir / ".tensors-000003.safetensors.k2j3h4g5.tmp", cdir / ".progress.json.a_b1c2d3.tmp",
            run_dir / ".records.jsonl.zz9yy8xx.tmp", run_dir / ".manifest.json.q1w2e3r4.tmp"]
    others = [cdir / "notes.tmp", cdir / ".notes.txt.k2j3h4g5.tmp",
              run_dir / ".tensors-000003.safetensors.k2j3h4g5.tmp", run_dir / "mine.tmp"]
    for path in ours + others:
        path.write_bytes(b"\0" * 100)
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert [p for p in ours if p.exists()] == []
    assert [p for p in others if p.exists()] == others

    # a start in a directory where a killed start left its manifest's temporary file
    fresh = tmp_path / "runs" / "fresh"
    fresh.mkdir()
    (fresh / ".manifest.json.q1w2e3r4.tmp").write_text('{"run_id": ')
    assert main(["run", "--model", "random:llama-tiny", "--device", "cpu", "--n-edits", "1",
                 "--no-generation-eval", "--out", str(tmp_path / "runs"), "--run-id",
                 "fresh"]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == [".lock", "checkpoint", "manifest.json",
                                                        "records.jsonl"]


# ------------------------------------------------------------------------------ model cache


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
    return dst


def _entry_copy(tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """A private cache holding a copy of the session cache's converted SmolLM2, which the
    test may damage (the weights hard-linked, never written; every other file copied), and
    an unrelated model directory. Returns (gguf, the session's entry, the copy)."""
    gguf = models._smollm2_gguf()
    shared = models.cache_dir() / "models" / models._hash_marker(gguf)
    entry = tmp_path / "cache" / "models" / shared.name
    entry.mkdir(parents=True)
    for f in shared.iterdir():
        (_link_or_copy if f.name == "model.safetensors" else shutil.copy2)(f, entry / f.name)
    (entry.parent / "other-model").mkdir()
    (entry.parent / "other-model" / "config.json").write_text("{}")
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    return gguf, shared, entry


def _same_tokenizer(tok: Any, tiny_lm: Any) -> bool:
    text = "The Eiffel Tower is in"
    return tok(text)["input_ids"] == tiny_lm.tokenizer(text)["input_ids"]


def test_truncated_model_cache_file_is_converted_again(tmp_path, tiny_lm, monkeypatch):
    """The issue's cache: tokenizer.json cut short under a .complete marker. Every load used to
    fail with a JSONDecodeError, forever; now its size gives it away, and the GGUF is
    converted again (for real), warned about, once."""
    gguf, _, entry = _entry_copy(tmp_path, monkeypatch)
    tok_file = entry / "tokenizer.json"
    good = tok_file.read_bytes()
    tok_file.write_bytes(good[:1000])
    with pytest.warns(UserWarning, match=re.escape(
            f"model cache {entry}: tokenizer.json holds 1000 bytes, {len(good)} when "
            f"converted; converting {gguf.name} again")):
        tok = models.load_tokenizer_for_random()
    assert _same_tokenizer(tok, tiny_lm) and tok_file.read_bytes() == good
    assert json.loads((entry / ".complete").read_text())["hashed"] == "conversion"
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, "other-model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same_tokenizer(models.load_tokenizer_for_random(), tiny_lm)


def _fake_conversion(shared: Path, monkeypatch) -> None:
    """Conversion by copying the session cache's entry (seconds instead of a minute); the
    hashing, the swap and the locking around it are the real ones."""
    monkeypatch.setattr(models, "_dequantise", lambda gguf, tmp: shutil.copytree(
        shared, tmp, copy_function=_link_or_copy))


def test_damaged_model_cache_is_rebuilt_under_its_key_lock(tmp_path, tiny_lm, monkeypatch):
    """tokenizer.json overwritten in place with its size and mtime kept (the hash memo still
    vouches for it): the load fails to parse it, the full check finds the damage, and the
    entry is rebuilt, but only once the process holding the entry's key lock has let go."""
    gguf, shared, entry = _entry_copy(tmp_path, monkeypatch)
    _fake_conversion(shared, monkeypatch)
    assert _same_tokenizer(models.load_tokenizer_for_random(), tiny_lm)  # memos written
    tok_file = entry / "tokenizer.json"
    good, st = tok_file.read_bytes(), tok_file.stat()
    damaged = b"{" + b" " * (len(good) - 1)
    tok_file.write_bytes(damaged)
    os.utime(tok_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    result: dict[str, Any] = {}

    def load() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                result["tok"] = models.load_tokenizer_for_random()
            except Exception as exc:  # reported by the asserts below
                result["error"] = exc
        result["warnings"] = [str(w.message) for w in seen]

    lock = tmp_path / "cache" / "locks" / f"model-{entry.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with held_elsewhere("key", lock):
        loader = threading.Thread(target=load)
        loader.start()
        loader.join(timeout=5)
        assert loader.is_alive(), result  # waiting for the key lock
        assert tok_file.read_bytes() == damaged  # and nothing touched meanwhile
    loader.join(timeout=300)
    assert "error" not in result, result
    assert _same_tokenizer(result["tok"], tiny_lm) and tok_file.read_bytes() == good
    (warned,) = [w for w in result["warnings"] if w.startswith("model cache")]
    assert warned.startswith(f"model cache {entry}: loading failed (")  # the parser's words
    assert warned.endswith(f") and tokenizer.json does not match its SHA-256; converting "
                           f"{gguf.name} again")
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, "other-model"])


def test_entry_from_older_code_is_trusted_then_rebuilt_when_it_fails(tmp_path, tiny_lm,
                                                                    monkeypatch):
    """An entry written before entries held file hashes (.complete: gguf and sha256 only)
    with tokenizer.json cut short: its hashes are taken as it is on first use, the load fails,
    and since they were only taken then, the GGUF is converted again."""
    gguf, shared, entry = _entry_copy(tmp_path, monkeypatch)
    _fake_conversion(shared, monkeypatch)
    (entry / ".complete").write_text(json.dumps({"gguf": str(gguf), "sha256": entry.name}))
    tok_file = entry / "tokenizer.json"
    good = tok_file.read_bytes()
    tok_file.write_bytes(good[:1000])
    with pytest.warns(UserWarning, match=r"model cache .*: loading failed \(.*\) and hashed "
                                         r"on first use; converting .* again"):
        tok = models.load_tokenizer_for_random()
    assert _same_tokenizer(tok, tiny_lm) and tok_file.read_bytes() == good
    assert json.loads((entry / ".complete").read_text())["hashed"] == "conversion"
