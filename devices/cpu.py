"""The local CPU through ONNX Runtime: real measurements, never estimates."""
from __future__ import annotations

from pathlib import Path

from .measurement import Measurement
from .profile import DeviceProfile, check_ready, script_errors

# A spread wider than this (coefficient of variation) is reported as a note on the measurement.
NOISY_CV = 0.5


class OnnxRuntimeCPU:
    def __init__(self, profile: DeviceProfile):
        self.profile = profile

    def available(self) -> bool:
        return self.why_unavailable() is None

    def why_unavailable(self) -> str | None:
        if not self.profile.local:
            return (f"{self.profile.name} is reached over {self.profile.connection}: this class measures here; "
                    "get_device() gives a remote board a devices.remote.RemoteDevice")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
        return None

    def measure(self, model: str | Path, *, batch: int = 1, warmup: int = 10, runs: int = 100,
                max_seconds: float = 30.0, precision: str = "fp32", dims: dict | None = None) -> Measurement:
        from . import bench_onnxruntime

        check_ready(self, precision)
        with script_errors(self.profile.name):
            r = bench_onnxruntime.measure(str(model), batch=batch, threads=self.profile.threads, warmup=warmup,
                                          runs=runs, max_seconds=max_seconds, dims=dims)
        m = Measurement(device=self.profile.name, precision=precision, artifact=Path(model).name, **r)
        if m.cv > NOISY_CV:
            m.notes.append(f"wide spread: coefficient of variation {m.cv:.2f}")
        return m
