"""User-facing errors.

Every error caused by bad input is a `RobustDataError`: the CLI prints it as one
line and exits non-zero, without a traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path


class RobustDataError(Exception):
    """Bad input or configuration; the message says what to do."""

    exit_code = 2


class DataError(RobustDataError):
    """A problem with a specific file (and, where known, a sample key in it)."""

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.key is not None:
            where.append(f"key {self.key!r}")
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class IntegrityError(DataError):
    """Bytes on disk do not match the hash recorded for them."""

    exit_code = 3
