"""Artifact: one exported model file and what is needed to trust and run it."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ExportError(Exception):
    """A user-facing export problem (unsupported operator, parity failure, missing toolchain)."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    path: str  # relative to the bundle root once in a bundle
    format: str  # onnx, tensorrt, openvino, tflite, vela
    precision: str  # fp32, fp16, int8
    sha256: str
    bytes: int
    inputs: list[dict] = field(default_factory=list)  # [{name, shape, dtype}]
    outputs: list[dict] = field(default_factory=list)
    opset: int | None = None
    toolchain: dict = field(default_factory=dict)
    role: str = "student"  # student | teacher
    parent: str = ""  # the stage that produced it
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Artifact":
        return cls(**d)
