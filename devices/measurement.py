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
    # Roofline: filled by add_roofline() when the caller knows the model's FLOPs per sample.
    flops: float | None = None  # per sample (one batch item)
    gflops: float | None = None  # attained, at the p50 latency
    peak_gflops: float | None = None  # the profile's peak for this precision
    roofline: float | None = None  # gflops / peak_gflops
    extra: dict = field(default_factory=dict)  # runtime-specific facts (precision hint, Vela's SRAM use, ...)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        return cls(**d)

    def add_roofline(self, flops: float | None, profile) -> "Measurement":
        """Attained GFLOP/s at p50 and its ratio to the profile's peak for this precision (in place)."""
        if not flops or self.p50_ms <= 0:
            return self
        self.flops = float(flops)
        self.gflops = flops * self.batch / (self.p50_ms * 1e-3) / 1e9
        self.peak_gflops = peak_gflops(profile, self.precision)
        self.roofline = self.gflops / self.peak_gflops if self.peak_gflops else None
        return self

    @property
    def label(self) -> str:
        return "estimated" if self.estimated else "measured"


def peak_gflops(profile, precision: str) -> float | None:
    """The profile's peak for ``precision``: options.peak_gflops_by_precision, else peak_gflops."""
    by = (getattr(profile, "options", None) or {}).get("peak_gflops_by_precision") or {}
    return float(by[precision]) if precision in by else profile.peak_gflops
