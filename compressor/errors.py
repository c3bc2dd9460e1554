"""User-facing errors: the CLI prints them as one line and exits 2 (tracebacks only with --debug)."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad recipe, a missing file, a teacher that does not build."""


class StageError(UserError):
    """A stage refused to pass on a bad result (NaN loss, export mismatch)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage



def first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: the message's first line`` (cut at ``limit``), for a one-line error or log."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
