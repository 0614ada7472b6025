"""The nox sessions pass their arguments on as documented (``nox`` itself replaced by a stub:
the sessions are plain functions of a session object)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class Session:
    """What a session function uses of ``nox.Session``: posargs, install, run."""

    def __init__(self, *posargs: str) -> None:
        self.posargs, self.runs = list(posargs), []

    def install(self, *args: str) -> None:
        pass

    def run(self, *args: str, env: dict | None = None) -> None:
        self.runs.append(list(args))


@pytest.fixture
def noxfile(monkeypatch):
    stub = types.ModuleType("nox")
    stub.options = types.SimpleNamespace()
    stub.session = lambda f: f
    stub.Session = Session
    monkeypatch.setitem(sys.modules, "nox", stub)
    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("posargs", "expected"), [
    ((), ["--jobs", "2"]),
    (("--grid", "reproduce"), ["--grid", "reproduce", "--jobs", "2"]),
    (("--grid", "x", "--jobs", "4"), ["--grid", "x", "--jobs", "4"]),
    (("--jobs=1",), ["--jobs=1"]),
])
def test_benchmark_keeps_two_jobs_unless_told(noxfile, posargs, expected):
    s = Session(*posargs)
    noxfile.benchmark(s)
    assert s.runs == [["python", "-m", "harness.benchmark", *expected]]


@pytest.mark.parametrize(("posargs", "expected"), [
    ((), ["--write"]),
    (("--check",), ["--check"]),
    (("--methods", "rome"), ["--write", "--methods", "rome"]),
    (("--check", "--methods", "rome"), ["--check", "--methods", "rome"]),
])
def test_golden_passes_its_arguments_on(noxfile, posargs, expected):
    s = Session(*posargs)
    noxfile.golden(s)
    assert s.runs == [["python", "-m", "harness.golden", *expected]]


def test_smoke_runs_the_smoke_grid(noxfile):
    s = Session("--n-edits", "1")
    noxfile.smoke(s)
    assert s.runs == [["python", "-m", "harness.benchmark", "--grid", "smoke", "--n-edits", "1",
                       "--jobs", "2"]]
