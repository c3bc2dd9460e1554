"""Latency of a candidate on a target device: measured, or predicted by a per-device model fitted on a
few measured candidates. Every number says which it is.

The model is linear in FLOPs and parameters (latency = a + b * MFLOPs + c * Mparams), non-negative
least squares:
small CNNs on a CPU are close to that, and a search needs ranking more than exact milliseconds. The
fit's points and its R^2 go into the manifest, so a reader can judge it.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


def measure_model(model: nn.Module, example: torch.Tensor, device, *, warmup: int = 5, runs: int = 30,
                  max_seconds: float = 2.0) -> float:
    """p50 milliseconds at batch 1: export to ONNX in a temporary directory and measure on ``device``."""
    from exporters.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="compressor-search-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        export_onnx(model, (example[:1],), path, dynamic_batch=False)
        m = device.measure(path, batch=1, warmup=warmup, runs=runs, max_seconds=max_seconds)
    return float(m.p50_ms)


@dataclass
class LatencyModel:
    device: str
    coef: list[float]  # intercept (ms), ms per MFLOP, ms per M parameters
    points: list[dict] = field(default_factory=list)  # the measured candidates: mflops, mparams, p50_ms
    r2: float | None = None
    label: str = "predicted"

    def predict(self, flops: float, params: float) -> float:
        a, b, c = self.coef
        # A floor at a fraction of the fastest measurement: a linear fit may dip below zero off its data.
        floor = 0.5 * min((p["p50_ms"] for p in self.points), default=0.0)
        return max(floor, a + b * flops / 1e6 + c * params / 1e6)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        return cls(**d)


def fit(device_name: str, points: list[dict]) -> LatencyModel:
    """Least squares on points of (mflops, mparams, p50_ms)."""
    import numpy as np

    from scipy.optimize import nnls

    x = np.array([[1.0, p["mflops"], p["mparams"]] for p in points])
    y = np.array([p["p50_ms"] for p in points])
    # Non-negative coefficients: more work never predicts less time. Plain least squares on a few noisy
    # measurements (a busy machine) gave a negative intercept and per-parameter cost, so small
    # candidates all fell to the floor.
    coef, _ = nnls(x, y)
    pred = x @ coef
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else None
    return LatencyModel(device_name, [float(c) for c in coef], points, r2)


def calibrate(device_name: str, device, build, genomes: list[dict], example: torch.Tensor, log=print,
              **measure_kw) -> LatencyModel:
    """Measure ``genomes`` (built by ``build(genome) -> (model, flops, params)``) and fit the model."""
    from .proxies import cost

    points = []
    for g in genomes:
        model = build(g)
        ms = measure_model(model, example, device, **measure_kw)
        n, f = cost(lambda: build(g), example)
        points.append({"genome": g, "mflops": f / 1e6, "mparams": n / 1e6, "p50_ms": ms})
    lm = fit(device_name, points)
    log(f"latency model for {device_name}: {lm.coef[0]:.4f} ms + {lm.coef[1]:.5f} ms/MFLOP + "
        f"{lm.coef[2]:.4f} ms/Mparam from {len(points)} measured candidates (R^2 "
        f"{'n/a' if lm.r2 is None else f'{lm.r2:.3f}'})")
    return lm
