"""Help texts: ``keh --help`` is whole, every option of ``keh run`` says what it does and shows
its default, and the texts of the generation options say what they really do."""

from __future__ import annotations

import argparse

import pytest

from harness.cli import EPILOG, build_parser
from harness.config import RunConfig


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping (argparse breaks lines at hyphens)


def help_of(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_top_level_help_is_whole(capsys):
    text = help_of(capsys=capsys)
    assert text.endswith(" ".join(EPILOG.split()))
    for command in ("run", "list", "report", "compare", "data"):
        assert f" {command} " in text


def test_every_run_option_has_help_and_its_default(capsys):
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    text = help_of("run", capsys=capsys)
    d = RunConfig()
    for action in run._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
    for flag, default in (("--method", d.method), ("--n-edits", d.n_edits),
                          ("--batch-size", d.batch_size), ("--suite", d.suite),
                          ("--eval-every", d.eval_every), ("--answer-tokens", d.answer_tokens)):
        option = next(a for a in run._actions if flag in a.option_strings)
        shown = text.split(" ".join(option.help.split()), 1)[1]
        assert shown.startswith(f" (default: {default})"), (flag, shown[:40])
    assert "(default: batch mode" in text  # --sequential: what its absence means


def test_generation_options_say_what_they_do(capsys):
    text = help_of("run", capsys=capsys)
    assert "greedy tokens per prompt" not in text
    assert ("With --fluency-decoding sample_top5_100 every text is 100 tokens in total "
            "whatever the value") in text
    assert "turn the greedy-answer evaluation off (--answer-tokens 0" in text


def test_old_spellings_still_parse():
    args = build_parser().parse_args(["run", "--out", "x"])
    assert args.out == "x" and build_parser().parse_args(["run", "--out-dir", "y"]).out == "y"


def test_one_name_per_setting_across_commands():
    """``keh run``'s names (and defaults) in the regression gate and ``harness.stats``; the
    old spellings still parse."""
    from harness import regress, stats

    base = ["--method", "ft", "--against", "noop"]
    ap = regress.build_parser()
    assert RunConfig().sequential is regress.PROTOCOLS[ap.parse_args(base).protocol].sequential
    assert regress.PROTOCOLS[ap.parse_args([*base, "--protocol", "sequential"]).protocol
                             ].sequential is True
    assert ap.parse_args([*base, "--out-dir", "a"]).out == ap.parse_args([*base, "--out", "a"]).out
    new = stats.build_parser().parse_args(
        ["--layers", "4", "--stats-sampling", "tokens", "--stats-records", "5",
         "--stats-tokens", "7", "--stats-seq-len", "9", "--stats-corpus", "c.txt"])
    old = stats.build_parser().parse_args(
        ["--layers", "4", "--sampling", "tokens", "--records", "5", "--tokens", "7",
         "--seq-len", "9", "--corpus", "c.txt"])
    assert vars(new) == vars(old)
    assert (new.sampling, new.records, new.tokens, new.seq_len, new.corpus) == (
        "tokens", 5, 7, 9, "c.txt")
    assert new.device == RunConfig().device == "auto"
