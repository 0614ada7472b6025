"""The newcomer's path: every command in the code blocks of README.md and docs/USAGE.md runs as
written from a fresh copy of the checkout with ``../shared`` beside it, and every file the two
documents name exists.

A command is one line of a ``bash`` code block (a trailing backslash joins the next line). Its
comment may shorten it for the test: ``docs test: --n-edits 2 --downstream-limit 5`` appends
those flags (for a ``nox`` session after ``--``); no other flag is allowed; ``docs test: exit 1``
says the command is expected to exit 1 (a gate that finds a worse variant), not 0. ``not run by the
docs test`` skips a command: only ``nox -s tests``, which is the test suite itself, may say
so. The slow test runs the commands in order, README first, in a copy of the tracked and
untracked (not ignored) files, inside a virtual environment that sees the installed packages,
with ``$KEH_DATA_DIR`` unset (the data comes from ``../shared/data`` as a newcomer's would)
and the user's ``$KEH_CACHE`` (warm caches). ``nox -s docs`` runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/USAGE.md")
SHRINK_FLAGS = ("--n-edits", "--downstream-limit")
SKIP = "not run by the docs test"
MAY_SKIP = {"nox -s tests"}
#: top-level entries of the checkout: an inline-code path starting with one must exist
TOP = ("docs", "harness", "methods", "suites", "reports", "tests", "tools", "noxfile.py",
       "pyproject.toml", "README.md")
TIMEOUT_S = 3600


@dataclass
class Command:
    doc: str
    line: int
    text: str
    flags: tuple[str, ...] = ()
    skip: bool = False
    expect: int = 0

    def shell(self) -> str:
        """The command as the test runs it (shortened where its comment says so)."""
        if not self.flags:
            return self.text
        extra = " ".join(self.flags)
        if self.text.startswith("nox ") and " -- " not in f"{self.text} ":
            return f"{self.text} -- {extra}"
        return f"{self.text} {extra}"


def _split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of a shell line: the comment starts at the first '#' outside quotes
    that follows whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def commands(doc: str, text: str) -> list[Command]:
    """The commands of the ``bash`` code blocks of a Markdown text."""
    out: list[Command] = []
    block, pending, start = False, "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("```"):
            block = raw.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        code, comment = _split_comment(raw)
        if not pending:
            start = n
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        full = (pending + code.strip()).strip()
        pending = ""
        if not full:
            continue
        flags: tuple[str, ...] = ()
        found = re.search(r"docs test: ((?:--[a-z-]+ \d+ ?)+)", comment)
        if found:
            flags = tuple(found.group(1).split())
        code_ = re.search(r"docs test:.*\bexit (\d)", comment)
        out.append(Command(doc, start, full, flags, SKIP in comment,
                           int(code_.group(1)) if code_ else 0))
    return out


def named_paths(text: str) -> set[str]:
    """Files of the checkout a Markdown text names: relative link targets and inline-code
    paths that start with a top-level entry of the checkout (no placeholders or globs)."""
    found = {m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", text)
             if not m.startswith(("http://", "https://", "#"))}
    for code in re.findall(r"`([^`\s]+)`", text):
        if code.split("/")[0] in TOP and not re.search(r"[<>*{}$~]", code):
            found.add(code)
    return {p for p in found if p}


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands(doc, (ROOT / doc).read_text(encoding="utf-8"))]


def test_commands_are_found_and_only_shortened_by_the_allowed_flags():
    cmds = all_commands()
    texts = [c.text for c in cmds]
    assert texts[:3] == ["pip install nox", "nox -s benchmark", "nox -s tests"]
    assert ("keh run --model smollm2-135m --method ft --suite counterfact --n-edits 100 "
            "--batch-size 10 --sequential --seed 0 --out-dir runs/mine") in texts
    assert {c.text for c in cmds if c.skip} == MAY_SKIP
    for c in cmds:
        names = c.flags[::2]
        assert set(names) <= set(SHRINK_FLAGS), (c.doc, c.line, c.flags)
    bench = next(c for c in cmds if c.text == "nox -s benchmark")
    assert bench.shell() == "nox -s benchmark -- --n-edits 1"


def test_parser_joins_lines_and_reads_markers():
    text = ("x\n```bash\nkeh run --a 1 \\\n    --b '#x' 2    # docs test: --n-edits 3\n"
            "nox -s tests  # not run by the docs test\nnox -s regress  # docs test: exit 1\n"
            "```\n```python\nkeh no\n```\n")
    cmds = commands("d", text)
    assert [(c.line, c.text, c.flags, c.skip, c.expect) for c in cmds] == [
        (3, "keh run --a 1 --b '#x' 2", ("--n-edits", "3"), False, 0),
        (5, "nox -s tests", (), True, 0), (6, "nox -s regress", (), False, 1)]
    assert cmds[0].shell() == "keh run --a 1 --b '#x' 2 --n-edits 3"


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_the_docs_name_exists(doc):
    base = (ROOT / doc).parent
    missing = []
    for p in sorted(named_paths((ROOT / doc).read_text(encoding="utf-8"))):
        if not ((base / p).exists() or (ROOT / p).exists()):
            missing.append(p)
    assert missing == [], f"{doc} names files that do not exist: {missing}"


def _copy_checkout(target: Path) -> None:
    """Tracked and untracked, not ignored, files of the checkout (its working tree)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / rel)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KEH_DOCS_TEST") != "1",
                    reason="runs every documented command at its defaults (hours on a CPU): "
                           "nox -s docs")
def test_the_docs_commands_run_as_written(tmp_path, shared_data):
    clone = tmp_path / "keh"
    _copy_checkout(clone)
    (tmp_path / "shared").symlink_to(shared_data.resolve().parent, target_is_directory=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEH_DATA_DIR", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    for c in all_commands():
        if c.skip:
            continue
        done = subprocess.run(["bash", "-c", c.shell()], cwd=clone, env=env, text=True,
                              capture_output=True, timeout=TIMEOUT_S)
        assert done.returncode == c.expect, (
            f"{c.doc}:{c.line}: `{c.shell()}` exited {done.returncode}\n"
            f"{(done.stdout + done.stderr)[-4000:]}")
    for doc in DOCS:
        base = (clone / doc).parent
        missing = [p for p in sorted(named_paths((clone / doc).read_text(encoding="utf-8")))
                   if not ((base / p).exists() or (clone / p).exists())]
        assert missing == [], f"{doc} names files missing in the clone: {missing}"
    for made in ("reports_out/mine/index.md", "reports_out/benchmark/index.md",
                 "reports_out/benchmark/headline.md", "reports_out/reproduce/index.md"):
        assert (clone / made).is_file(), f"the commands wrote no {made}"
