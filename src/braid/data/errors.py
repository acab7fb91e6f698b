"""The error raised for bad data inputs: it names the file and, where there is one, the line."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data (missing file, invalid JSON or UTF-8, empty text, ...).

    The message starts with `path:line:` (or `path:` for whole-file problems) so that
    editors and terminals can jump to the offending place.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)
