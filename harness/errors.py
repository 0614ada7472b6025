"""Errors the CLI turns into one clear line and a non-zero exit (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: unknown name, malformed data or hparams, impossible request.

    The message must say what is wrong, where (file, record index, field) and what to do.
    """


class DataError(UserError):
    """A data file is missing or one of its records is malformed."""

    def __init__(self, path: object, message: str, index: int | None = None,
                 field: str | None = None) -> None:
        where = f"{path}"
        if index is not None:
            where += f", record {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.index, self.field = path, index, field
