"""Where the data lives: one definition for the harness and the suites."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: ``explicit``, else ``$KEH_DATA_DIR``, else ``./data``."""
    return Path(explicit or os.environ.get("KEH_DATA_DIR") or "data").expanduser()
