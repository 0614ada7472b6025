"""Where the data lives: one definition for the harness, the suites and ``keh data``.

The data directory is, in this order: an explicit path (``--data-dir``), ``$KEH_DATA_DIR``,
``../shared/data`` beside the checkout when this code runs from a checkout and that directory
exists, else ``./data`` (relative to the working directory). ``keh data list`` prints which one
was taken and why.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the checkout this code runs from (the directory holding ``pyproject.toml``), if any
CHECKOUT = Path(__file__).resolve().parent.parent
ENV = "KEH_DATA_DIR"


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout, if the code runs from a checkout and it exists."""
    if not (CHECKOUT / "pyproject.toml").is_file():
        return None
    shared = CHECKOUT.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def data_dir_origin(explicit: str | Path | None = None) -> tuple[Path, str]:
    """The data directory and, in words, why it was chosen."""
    if explicit:
        return Path(explicit).expanduser(), "--data-dir"
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser(), f"${ENV}"
    shared = shared_data_dir()
    if shared is not None:
        return shared, "../shared/data beside the checkout"
    return Path("data"), "./data (no $KEH_DATA_DIR and no ../shared/data beside the checkout)"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: ``explicit``, else ``$KEH_DATA_DIR``, else ``../shared/data`` beside
    the checkout if present, else ``./data``."""
    return data_dir_origin(explicit)[0]
