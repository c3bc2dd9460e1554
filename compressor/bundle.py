"""The deployment bundle: a directory and its versioned manifest.json.

Every file is written to a temporary name and renamed, so a crash never leaves half a file. The manifest
lists every file with its sha256, so ``verify`` catches a flipped byte anywhere.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exporters.artifact import sha256

from .errors import UserError
from .files import atomic_write, write_json  # noqa: F401  (where callers found them)

SCHEMA = "compressor.manifest/1"
MANIFEST = "manifest.json"


class BundleError(UserError):
    pass


@dataclass
class StageRecord:
    """What one stage did: its config, its metrics, how long it took, what it came from and made."""

    name: str
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # name -> path relative to the bundle, or data
    seconds: float = 0.0
    parent: str | None = None
    started: str = ""
    skipped: str | None = None  # why the stage did nothing (compressor.stages: its skip())

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["skipped"] is None:
            del d["skipped"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StageRecord":
        return cls(**d)


# What a manifest records; a Hugging Face run adds transformers, quantization and OpenVINO runs theirs.
TOOLCHAIN = ("compressor", "torch", "pytorch-lightning", "onnx", "onnxruntime", "numpy", "scikit-learn",
             "transformers", "nncf", "openvino")


def toolchain_versions(dists=TOOLCHAIN) -> dict:
    """Versions of the installed ``dists`` (those not installed are left out)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_hashes(root: Path) -> dict[str, dict]:
    return {rel: {"sha256": sha256(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in _listing(root) if (root / rel).is_file()}


def _listing(root: Path) -> list[str]:
    """Every file and symlink under ``root`` (relative, posix), without following symlinked folders."""
    out = []
    for d, dirs, files in os.walk(root, followlinks=False):
        for name in files + [x for x in dirs if (Path(d) / x).is_symlink()]:
            rel = (Path(d) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def read_manifest(bundle: str | Path) -> dict:
    bundle = Path(bundle)
    path = bundle / MANIFEST if bundle.is_dir() else bundle
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e.__class__.__name__}): the manifest is damaged or truncated") from None
    if not isinstance(m, dict):
        raise BundleError(f"{path}: the manifest is not a JSON object")
    if m.get("schema") != SCHEMA:
        raise BundleError(f"{path}: schema {m.get('schema')!r} is not {SCHEMA!r} (made by another version)")
    for key, kind in (("files", dict), ("stages", list), ("artifacts", list), ("measurements", list)):
        if not isinstance(m.get(key), kind):
            raise BundleError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    # A bundle from elsewhere is data, not trust: every path it names stays inside it.
    named = list(m["files"]) + [a.get("path") for a in m["artifacts"] if isinstance(a, dict)]
    for rel in named:
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel:
            raise BundleError(f"{path}: the manifest names {rel!r}, a path that leaves the bundle; refusing it")
    return m


def verify(bundle: str | Path) -> dict:
    """Check the schema and every file's hash; raise BundleError naming the first problem."""
    bundle = Path(bundle)
    m = read_manifest(bundle)
    problems = []
    root = bundle.resolve()
    for rel, info in m["files"].items():
        p = bundle / rel
        if not isinstance(info, dict) or "sha256" not in info:
            problems.append(f"{rel}: no hash recorded")
        elif not p.resolve().is_relative_to(root):  # through a symlink (the file's or a folder's)
            problems.append(f"{rel}: a symlink that leads out of the bundle; not followed")
        elif p.is_symlink():
            problems.append(f"{rel}: a symlink; a bundle holds plain files")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif isinstance(info.get("bytes"), int) and p.stat().st_size != info["bytes"]:
            # Before hashing: a file larger than the manifest says is never read whole.
            problems.append(f"{rel}: {p.stat().st_size:,} bytes, the manifest says {info['bytes']:,}")
        elif sha256(p) != info["sha256"]:
            problems.append(f"{rel}: modified (sha256 differs from the manifest)")
    listed = set(m["files"])
    extra = [rel for rel in _listing(bundle) if rel not in listed]
    problems += [f"{rel}: not listed in the manifest" for rel in extra]
    if problems:
        raise BundleError(f"bundle {bundle} failed verification: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return m
