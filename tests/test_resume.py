"""Reliability: resume after SIGKILL, refusal to mix runs, numerical guards, determinism notes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import methods
from harness import checkpoint as ckpt
from harness import records as rec_io
from harness.cli import main
from harness.config import RunConfig
from harness.errors import UserError
from harness.models import cache_dir
from harness.runner import RunError, resume, run
from methods.base import EditOutcome
from methods.solvers import NumericalError

ROOT = Path(__file__).resolve().parent.parent
QUIET = {"log": lambda s: None}

SEQ_ARGS = ["--method", "alphaedit", "--sequential", "--set", "layers=[1,2]",
            "--set", "stats_tokens=4000", "--set", "v_steps=5", "--set", "n_context=1"]
BATCH_ARGS = ["--method", "ft", "--set", "layers=[1]"]
OVERRIDES = {
    "seq": {"layers": [1, 2], "stats_tokens": 4000, "v_steps": 5, "n_context": 1},
    "batch": {"layers": [1]},
}


def _cfg(out: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(model="random:llama-tiny", method="noop", suite="counterfact",
                                n_edits=4, batch_size=2, device="cpu", out_dir=str(out),
                                run_id="r")
    base.update(kw)
    return RunConfig(**base)


def _records(run_dir: Path) -> bytes:
    return (run_dir / rec_io.RECORDS).read_bytes()


def _progress(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / ckpt.CHECKPOINT_DIR / ckpt.PROGRESS).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / rec_io.MANIFEST).read_text())["status"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, KEH_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.setdefault("KEH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return env


def _private_cache(path: Path) -> Path:
    """A fresh cache directory (its own key statistics) that borrows the converted tokenizer
    model of the session's cache (loaded by ``tiny_lm``) instead of converting it again."""
    shared = cache_dir()
    path.mkdir()
    for name in ("models", "hashes"):
        if (shared / name).is_dir():
            (path / name).symlink_to(shared / name, target_is_directory=True)
    return path


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "harness", "run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_then_resume_gives_identical_records(tmp_path, tiny_lm, shared_data,
                                                     monkeypatch):
    """Both modes at once (two CLI processes): SIGKILL each after >= 1 saved batch, resume
    with ``--resume``, compare records.jsonl byte for byte with an uninterrupted run of the same
    config and run id."""
    cache = _private_cache(tmp_path / "cache")
    monkeypatch.setenv("KEH_CACHE", str(cache))
    # the CLI processes run with one thread; a different thread count changes float reduction
    # order (and so the last bits of the records), so this process uses one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sigkill_then_resume(tmp_path, tiny_lm, cache)
    finally:
        torch.set_num_threads(threads)


def _sigkill_then_resume(tmp_path: Path, tiny_lm, cache: Path) -> None:
    # uninterrupted references, in this process (same seed, same weights as the CLI's model)
    ref = {
        "seq": run(_cfg(tmp_path / "ref", method="alphaedit", sequential=True, n_edits=12,
                        batch_size=3, hparams_overrides=OVERRIDES["seq"]), lm=tiny_lm, **QUIET),
        "batch": run(_cfg(tmp_path / "refb", method="ft", n_edits=12, batch_size=3,
                          hparams_overrides=OVERRIDES["batch"]), lm=tiny_lm, **QUIET),
    }
    env = _env(cache)
    common = ["--model", "random:llama-tiny", "--n-edits", "12", "--batch-size", "3",
              "--device", "cpu", "--run-id", "r"]
    procs = {
        "seq": _cli([*common, *SEQ_ARGS, "--out", str(tmp_path / "seq")], env),
        "batch": _cli([*common, *BATCH_ARGS, "--out", str(tmp_path / "batch")], env),
    }
    dirs = {"seq": tmp_path / "seq" / "r", "batch": tmp_path / "batch" / "r"}
    killed_at: dict[str, int] = {}
    deadline = time.monotonic() + 180
    while len(killed_at) < len(procs) and time.monotonic() < deadline:
        for mode, proc in procs.items():
            if mode in killed_at:
                continue
            prog = _progress(dirs[mode])
            if prog and prog["batches_done"] >= 1 and _status(dirs[mode]) == "running":
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at[mode] = prog["batches_done"]
            elif proc.poll() is not None:
                pytest.fail(f"{mode} run ended (rc {proc.returncode}) before it could be "
                            f"killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(killed_at) == 2, "timed out waiting for a checkpoint"
    for mode in procs:
        assert _status(dirs[mode]) == "running"
        assert killed_at[mode] < 4

    for mode in procs:  # the CLI's --resume, in this process (saves two interpreter starts)
        assert main(["run", "--resume", str(dirs[mode])]) == 0
    for mode in procs:
        assert _records(dirs[mode]) == _records(ref[mode]), mode
        manifest = json.loads((dirs[mode] / rec_io.MANIFEST).read_text())
        assert manifest["status"] == "complete"
        assert len(manifest["resumed"]) == 1
        assert manifest["resumed"][0]["at_batch"] >= 1
        assert manifest["summary"]["n_failed"] == 0


class _Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def _crash_on_call(monkeypatch, owner: Any, name: str, n: int) -> None:
    """Make ``owner.name`` raise :class:`_Crash` on its ``n``-th call (1-based)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


CRASH_HP = {"layers": [1], "steps": 3, "lr": 1e-2, "norm_constraint": 0.1}
CRASH_KW: dict[bool, dict[str, Any]] = {
    False: dict(method="ft", n_edits=8, batch_size=2, hparams_overrides=CRASH_HP),
    # 4 batches, curve every 2, final evaluation in two chunks (50 + 2)
    True: dict(method="ft", n_edits=52, batch_size=13, sequential=True, eval_every=2,
               hparams_overrides=CRASH_HP),
}


@pytest.fixture(scope="module")
def crash_refs(tmp_path_factory, tiny_lm, shared_data) -> dict[bool, Path]:
    """Uninterrupted runs of both :data:`CRASH_KW` configs."""
    out = tmp_path_factory.mktemp("refs")
    return {seq: run(_cfg(out / str(seq), **kw), lm=tiny_lm, **QUIET)
            for seq, kw in CRASH_KW.items()}


@pytest.mark.parametrize(("sequential", "crash_call"), [
    (False, 3),  # batch 2's records appended, not yet marked complete
    (True, 4),   # in the edit loop (batch 2 edited, not yet saved)
    (True, 6),   # all batches saved, the final evaluation not started
    (True, 7),   # the final evaluation's first chunk appended, not yet marked complete
])
def test_resume_in_process_after_crash(tmp_path, tiny_lm, monkeypatch, crash_refs,
                                       sequential, crash_call):
    """A crash at the ``crash_call``-th checkpoint save (nothing of it written), plus a torn
    last line, then a resume: records and curve identical to an uninterrupted run."""
    before = tiny_lm.rewrite_weight(1).clone()
    with monkeypatch.context() as m:
        _crash_on_call(m, ckpt, "save", crash_call)
        with pytest.raises(_Crash):
            run(_cfg(tmp_path, **CRASH_KW[sequential]), lm=tiny_lm, **QUIET)
    run_dir = tmp_path / "r"
    with open(run_dir / rec_io.RECORDS, "ab") as f:  # a line torn by the kill
        f.write(b'{"case_index": 9')
    resume(run_dir, lm=tiny_lm, **QUIET)
    ref = crash_refs[sequential]
    assert _records(run_dir) == _records(ref)
    if sequential:
        # equal curves apart from the memory readings (the process's RSS is not reproducible)
        assert _curve_without_memory(run_dir) == _curve_without_memory(ref)
    assert torch.equal(tiny_lm.rewrite_weight(1), before)
    assert len(list((run_dir / ckpt.CHECKPOINT_DIR).glob("tensors-*"))) == 1


# ---------------------------------------------------------------------------- refusing to mix

def _small_data(tmp_path: Path, shared_data: Path, n: int = 3) -> Path:
    data = json.loads((shared_data / "counterfact" / "counterfact-edit.json").read_text())
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(data[:n]))
    return path


def _interrupted(tmp_path: Path, tiny_lm: Any, shared_data: Path) -> tuple[Path, Path]:
    """A finished small run turned back into an interrupted one (status running)."""
    data = _small_data(tmp_path, shared_data)
    run_dir = run(_cfg(tmp_path / "runs", data=str(data), n_edits=3, batch_size=1), lm=tiny_lm,
                  **QUIET)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    manifest["status"] = "running"
    rec_io.write_json(run_dir / rec_io.MANIFEST, manifest)
    return run_dir, data


def _one_error_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("keh: error:"), err
    return err[0]


def test_resume_refuses_changed_data(tmp_path, tiny_lm, shared_data, capsys):
    run_dir, data = _interrupted(tmp_path, tiny_lm, shared_data)
    data.write_text(json.dumps(json.loads(data.read_text()), indent=1))  # same records
    line = _one_error_line(["run", "--resume", str(run_dir)], capsys)
    assert f"data file {data}" in line and "sha256" in line


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("config_hash", "0123456789", "config (config_hash 0123456789"),
    ("git", {"commit": "0" * 40, "dirty": False}, "code revision"),
    ("model", {"sha256": "f" * 64}, "differs from the run's manifest"),
])
def test_resume_refuses_mixing(tmp_path, tiny_lm, shared_data, field, value, needle):
    run_dir, _ = _interrupted(tmp_path, tiny_lm, shared_data)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    manifest[field] = value
    rec_io.write_json(run_dir / rec_io.MANIFEST, manifest)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        resume(run_dir, lm=tiny_lm, **QUIET)


def test_allow_revision_change(tmp_path, tiny_lm, shared_data):
    run_dir, _ = _interrupted(tmp_path, tiny_lm, shared_data)
    before = _records(run_dir)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    manifest["git"] = {"commit": "0" * 40, "dirty": False}
    rec_io.write_json(run_dir / rec_io.MANIFEST, manifest)
    resume(run_dir, lm=tiny_lm, allow_revision_change=True, **QUIET)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert manifest["resumed"][-1]["at_batch"] == 3 and "git" in manifest["resumed"][-1]
    assert _records(run_dir) == before


# ------------------------------------------------------------------------- numerical guards

def _test_method(monkeypatch, behaviour: dict[int, str]) -> dict[str, Any]:
    """Register method ``flaky``: adds 0.01 to layer 1's rewrite matrix per batch and, on the
    calls named in ``behaviour``, raises NumericalError after writing ('raise'), returns a NaN
    diagnostic ('nan'), returns non-tensor state ('badstate') or warns of a non-deterministic
    op ('warn'). Returns a log of calls (the weights each call started from)."""
    log: dict[str, Any] = {"entry": []}
    mod = types.ModuleType("keh_test_flaky")

    @__import__("dataclasses").dataclass
    class Hparams:
        layers: list[int] = __import__("dataclasses").field(default_factory=lambda: [1])

    def edit(lm, requests, hparams, state):
        call = len(log["entry"])
        log["entry"].append(lm.rewrite_weight(1).detach().clone())
        what = behaviour.get(call)
        lm.apply_delta(1, torch.full_like(lm.rewrite_weight(1), 0.01))
        if what == "raise":
            lm.apply_delta(1, torch.full_like(lm.rewrite_weight(1), 5.0))
            raise NumericalError("C0 is singular")
        if what == "warn":
            warnings.warn("fake_op does not have a deterministic implementation, but you set "
                          "'torch.use_deterministic_algorithms(True, warn_only=True)'.",
                          stacklevel=1)
        new_state = dict(state, n=state.get("n", torch.zeros(())) + 1)
        if what == "badstate":
            new_state["oops"] = [1, 2]
        diag = {"x": float("nan") if what == "nan" else 1.0}
        return EditOutcome(diagnostics=[dict(diag) for _ in requests], state=new_state)

    mod.NAME, mod.Hparams, mod.edit = "flaky", Hparams, edit
    monkeypatch.setitem(sys.modules, "keh_test_flaky", mod)
    monkeypatch.setitem(methods.METHODS, "flaky", "keh_test_flaky")
    return log


@pytest.mark.parametrize(("what", "error", "sequential"), [
    ("raise", "NumericalError: C0 is singular", True),
    ("nan", "non-finite diagnostics: x", True),
    ("raise", "NumericalError: C0 is singular", False),
])
def test_failed_batch_is_recorded_and_run_goes_on(tmp_path, tiny_lm, shared_data, monkeypatch,
                                                  what, error, sequential):
    log = _test_method(monkeypatch, {1: what})
    before = tiny_lm.rewrite_weight(1).clone()
    run_dir = run(_cfg(tmp_path, method="flaky", n_edits=6, sequential=sequential),
                  lm=tiny_lm, **QUIET)
    recs = rec_io.read_records(run_dir / rec_io.RECORDS)
    assert [r["case_index"] for r in recs] == list(range(6))
    assert [bool(r.get("failed")) for r in recs] == [False, False, True, True, False, False]
    for r in recs[2:4]:  # intention to treat: measured on the model the failure left
        assert r["error"] == error and r["case_id"] and r["diagnostics"] == {}
    assert all("efficacy_margin" in r for r in recs)
    if not sequential:  # batch mode: the weights were restored, so the unedited model's
        plain = run(_cfg(tmp_path / "noop", method="noop", n_edits=6), lm=tiny_lm, **QUIET)
        unedited = rec_io.read_records(plain / rec_io.RECORDS)
        assert [r["efficacy_margin"] for r in recs[2:4]] == [
            r["efficacy_margin"] for r in unedited[2:4]]
    # the third batch starts from the weights the failed one started from
    assert torch.equal(log["entry"][2], log["entry"][1])
    assert torch.equal(tiny_lm.rewrite_weight(1), before)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["n_failed"] == 2
    # the summary scores the failed edits' success 0 and keeps their margins
    itt = [0.0 if r.get("failed") else r["efficacy_success"] for r in recs]
    assert manifest["summary"]["efficacy_success"] == pytest.approx(100 * sum(itt) / 6)
    assert manifest["summary"]["efficacy_margin"] == pytest.approx(
        sum(r["efficacy_margin"] for r in recs) / 6)


def test_stop_on_error(tmp_path, tiny_lm, shared_data, monkeypatch):
    _test_method(monkeypatch, {1: "raise"})
    with pytest.raises(RunError, match=r"flaky failed on batch 1 \(cases 2..3\): NumericalError"):
        run(_cfg(tmp_path, method="flaky", n_edits=6, stop_on_error=True), lm=tiny_lm, **QUIET)
    manifest = json.loads((tmp_path / "r" / rec_io.MANIFEST).read_text())
    assert manifest["status"] == "error" and "NumericalError" in manifest["error"]


def test_non_tensor_state_is_refused(tmp_path, tiny_lm, shared_data, monkeypatch):
    _test_method(monkeypatch, {0: "badstate"})
    with pytest.raises(UserError, match="state 'oops' of type list"):
        run(_cfg(tmp_path, method="flaky", sequential=True), lm=tiny_lm, **QUIET)


def test_nondeterministic_ops_are_listed(tmp_path, tiny_lm, shared_data, monkeypatch):
    _test_method(monkeypatch, {0: "warn", 1: "warn"})
    run_dir = run(_cfg(tmp_path, method="flaky", sequential=True), lm=tiny_lm, **QUIET)
    manifest = json.loads((run_dir / rec_io.MANIFEST).read_text())
    assert manifest["nondeterministic_ops"] == [
        "fake_op does not have a deterministic implementation"]


def _curve_without_memory(run_dir) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "curve.jsonl").read_text().splitlines() if x]
    assert all("memory" in x for x in lines)
    return [{k: v for k, v in x.items() if k != "memory"} for x in lines]
