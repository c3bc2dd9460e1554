"""Measurement: one latency distribution of one model file on one device, measured or estimated."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Measurement:
    device: str
    runtime: str
    runtime_version: str
    precision: str
    batch: int
    threads: int
    input_shapes: dict
    warmup: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    cv: float
    estimated: bool
    artifact: str = ""
    provider: str = ""
    peak_rss_mb: float | None = None
    host: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        return cls(**d)

    @property
    def label(self) -> str:
        return "estimated" if self.estimated else "measured"
