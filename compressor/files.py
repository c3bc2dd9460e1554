"""Writing files so that a crash never leaves half of one: a temporary name, fsync, then a rename."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the run's stray-file sweep knows ".*.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
