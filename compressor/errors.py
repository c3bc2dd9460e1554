"""User-facing errors: the CLI prints them as one line and exits 2 (tracebacks only with --debug)."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad recipe, a missing file, a teacher that does not build."""


class StageError(UserError):
    """A stage refused to pass on a bad result (NaN loss, export mismatch)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage

