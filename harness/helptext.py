"""The help formatter of every keh command line: each option's text, then its default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help text followed by "(default: ...)", unless the text already names its default or
    there is none to name (None, False, an empty list or string; a default of 0 is shown)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or any(action.default is v for v in (None, False,
                                                                    argparse.SUPPRESS))
                or action.default in ([], "", ())):  # nothing to name: the help says it
            return text
        return super()._get_help_string(action)
