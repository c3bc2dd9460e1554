"""One run per output directory, held by the operating system."""
from __future__ import annotations

import os
from pathlib import Path

from .bundle import now
from .errors import UserError


class RunLock:
    """An OS lock (flock) on ``<out>.lock`` held while a run uses ``<out>.partial``: a second run, --resume
    or --force on the same directory refuses at once, naming the holder. The kernel drops the lock when
    its process dies, so a run killed with -9 leaves it free for --resume. The file holds the holder's
    pid and start time, for the message."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self.fd: int | None = None

    def acquire(self, work: Path) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                who = f"pid {held[0]}, started {held[1]}" if len(held) >= 2 else "another process"
                raise UserError(f"a run ({who}) is using {work}; wait for it to finish, or stop it first") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # the file we locked is still the lock file (a finishing run unlinks it)
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {now()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run then makes a fresh file
            os.close(self.fd)
            self.fd = None
